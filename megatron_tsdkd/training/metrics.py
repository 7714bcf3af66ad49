"""Step metrics: reduced across data-parallel ranks on the last pipeline stage, shown on global rank 0 as
TensorBoard scalars and a progress bar with ETA."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def reduce_to_rank0(local: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    """Collective. ``local`` is this rank's metrics on the last pipeline stage (None elsewhere). Means over the
    data-parallel group, then handed from the last stage to the first (where global rank 0 lives)."""
    names = sorted(local) if local else None
    if ps.is_pipeline_last_stage():
        values = torch.tensor([float(local[k]) for k in names], dtype=torch.float64)
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        values /= ps.get_data_parallel_world_size()
        local = dict(zip(names, values.tolist()))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        box = [local]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        local = box[0]
    return local if dist.get_rank() == 0 else None


class MetricsLogger:
    """TensorBoard + tqdm on global rank 0; a no-op elsewhere."""

    def __init__(self, log_dir: str, total_steps: int, start_step: int, progress_bar: bool):
        self.active = dist.get_rank() == 0
        self.writer = self.bar = None
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="tsdkd", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics.get('loss/total', float('nan')):.4f}",
                                 lr=f"{metrics.get('optim/lr', 0.0):.2e}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
