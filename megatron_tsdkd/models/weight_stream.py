"""Stream a TP/PP-sharded megatron model as full Hugging Face tensors to every rank of its model-parallel group.

The weight sync of the vLLM rollout replicas (generation/vllm_rollouts.py): every rank holds a whole TP=1 replica,
so every rank needs every tensor, but none should hold a second full copy of the model. So the tensors travel one
megatron parameter at a time: the TP ranks all-gather its shards (on the model's device), the mapping
(models/mapping.py, the one HF <-> megatron description) cuts the gathered shards into HF tensors, and the stage
that owns them broadcasts each over the pipeline group. Every rank of the group yields the same (name, tensor)
sequence, in the same order; a consumer that copies each tensor away (vLLM's reload does) keeps the extra memory
at one parameter. The tied output-layer copy is not sent (vLLM ties it to the embedding, as HF does).

Collective over the model's TP and PP groups: every rank of both must drain the iterator.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_tsdkd.models.hf_export import gathered_shards
from megatron_tsdkd.models.mapping import hf_tensor_shapes, stage_layouts
from megatron_tsdkd.runtime.collectives import all_gather_objects


def _stage_facts(model) -> dict:
    """What ``stage_layouts`` needs to know about one pipeline stage, beyond the architecture and TP layout."""
    return dict(layer_numbers=[layer.layer_number - 1 for layer in model.decoder.layers],
                pre_process=model.pre_process, post_process=model.post_process,
                has_output_weight=model.post_process and model.output_layer.weight is not None)


def stream_hf_tensors(model, spec) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every tensor of the HF checkpoint of ``model`` (a GPTModel stage, unwrapped),
    identical on every rank of its model-parallel group; dtype and device are the model's."""
    from megatron.core import parallel_state as ps

    tp, tp_group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    pp, pp_group = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_group()
    my_stage = ps.get_pipeline_model_parallel_rank()
    stage_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else [None]
    stages = all_gather_objects(_stage_facts(model), group=pp_group) if pp > 1 else [_stage_facts(model)]
    params = dict(model.named_parameters())
    sample = next(iter(params.values()))
    shapes = hf_tensor_shapes(spec)
    for stage, facts in enumerate(stages):
        per_rank = [stage_layouts(spec, tp_rank=r, tp=tp, padded_vocab=model.vocab_size, **facts) for r in range(tp)]
        for i, layout in enumerate(per_rank[0]):
            if not layout.export:
                continue
            names = list(dict.fromkeys(p.hf_name for r in range(tp) for p in per_rank[r][i].pieces))
            hf = {n: torch.empty(shapes[n], dtype=sample.dtype, device=sample.device) for n in names}
            if stage == my_stage:
                shards = gathered_shards(params[layout.mcore_name].detach(), layout, tp, tp_group)
                for r in range(tp if layout.tp_split else 1):
                    per_rank[r][i].scatter(shards[r], hf)
            for name in names:
                if pp > 1:
                    dist.broadcast(hf[name], src=stage_ranks[stage], group=pp_group)
                yield name, hf.pop(name)
