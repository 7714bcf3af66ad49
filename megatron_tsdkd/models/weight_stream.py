"""Stream a TP/PP-sharded megatron model as full Hugging Face tensors to every rank of its model-parallel group.

The weight sync of the vLLM rollout replicas (generation/vllm_rollouts.py): every rank holds a whole TP=1 replica,
so every rank needs every tensor, but none should hold a second full copy of the model. So the tensors travel in
buckets: consecutive parameters of one pipeline stage, in one dtype (the model's), whose gathered size (the full
megatron parameters, vocabulary padding included) is at most ``bucket_bytes``; a larger parameter is a bucket of its
own. Per bucket, the owning stage's TP ranks pack their shards of its TP-split parameters into one flat buffer and
all-gather it into the bucket buffer (one collective), copy its replicated parameters (norms) behind them, and the
stage broadcasts the bucket buffer over the pipeline group (one collective). Every rank then cuts it, one parameter
at a time, into HF tensors with the mapping (models/mapping.py, the one HF <-> megatron description) and yields them.
The bucket plan follows from the stage layouts every rank computes alike, so it costs no message.

Collectives per stream, on each rank: one object all-gather of the stages' facts (PP > 1), one broadcast per bucket
of every stage (PP > 1), one all-gather per bucket of its own stage that holds a TP-split parameter (TP > 1).
Memory beyond the model, per rank: the bucket buffer (<= bucket_bytes, or the one larger parameter), the rank's send
buffer while it gathers (1/TP of the bucket's split part) and the HF tensors of one parameter, plus the last one
the consumer still holds (vLLM's reload copies each tensor away): <= bucket_bytes x (1 + 1/TP) + 2 x the largest
parameter. The buffer travels in the gathered megatron layout, so no rank holds a second, HF-ordered bucket and
every yielded tensor owns its memory; the price is one device copy (the cut) on the receiving stages. Every buffer
is on the model's device. The tied output-layer copy is not sent (vLLM ties it to the embedding, as HF does).

Collective over the model's TP and PP groups: every rank of both must drain the iterator.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_tsdkd.models.builder import expert_group
from megatron_tsdkd.models.mapping import ShardLayout, hf_tensor_shapes, stage_layouts
from megatron_tsdkd.runtime.collectives import all_gather_objects

DEFAULT_BUCKET_BYTES = 256 * 1024**2


def _stage_facts(model) -> dict:
    """What ``stage_layouts`` needs to know about one pipeline stage, beyond the architecture and TP layout."""
    return dict(layer_numbers=[layer.layer_number - 1 for layer in model.decoder.layers],
                pre_process=model.pre_process, post_process=model.post_process,
                has_output_weight=model.post_process and model.output_layer.weight is not None)


def _gathered(layout: ShardLayout, tp: int) -> bool:
    """Whether the parameter travels through the TP all-gather (split over more than one rank)."""
    return layout.tp_split and tp > 1


def _gathered_numel(layout: ShardLayout, tp: int) -> int:
    return prod(layout.shard_shape) * (tp if _gathered(layout, tp) else 1)


def bucket_plan(per_rank: Sequence[Sequence[ShardLayout]], itemsize: int, bucket_bytes: int) -> list[list[int]]:
    """The exported parameters of one stage (indices into its layouts; ``per_rank[r]``: TP rank r's layouts), in
    order, grouped into buckets of at most ``bucket_bytes`` once gathered; a larger parameter is a bucket alone."""
    tp = len(per_rank)
    buckets, current, size = [], [], 0
    for i, layout in enumerate(per_rank[0]):
        if not layout.export:
            continue
        nbytes = _gathered_numel(layout, tp) * itemsize
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


@dataclass(frozen=True)
class _Bucket:
    """Where each parameter of a bucket lies in its buffer: the TP-split ones rank-major first (rank r's shards,
    packed in order, at ``r * split_numel``), then the replicated ones."""

    split: tuple[tuple[int, int], ...]        # (layout index, offset within a rank's block)
    replicated: tuple[tuple[int, int], ...]   # (layout index, offset within the buffer)
    split_numel: int                          # one rank's block
    numel: int

    @classmethod
    def of(cls, indices: Sequence[int], layouts: Sequence[ShardLayout], tp: int) -> "_Bucket":
        split, replicated, offset = [], [], 0
        for i in indices:
            if _gathered(layouts[i], tp):
                split.append((i, offset))
                offset += prod(layouts[i].shard_shape)
        split_numel = offset
        offset *= tp
        for i in indices:
            if not _gathered(layouts[i], tp):
                replicated.append((i, offset))
                offset += prod(layouts[i].shard_shape)
        return cls(tuple(split), tuple(replicated), split_numel, offset)


def _all_gather_flat(out: torch.Tensor, local: torch.Tensor, group) -> None:
    """One all-gather of equal flat blocks into ``out`` (torch 2.13 renamed all_gather_into_tensor, the older
    torch of some GPU nodes has only that name)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


def _fill(buffer: torch.Tensor, bucket: _Bucket, layouts: Sequence[ShardLayout], params: dict, tp: int,
          tp_group) -> None:
    """The owning stage: the bucket's parameters gathered over TP into ``buffer`` (collective over the TP group)."""
    if bucket.split:
        local = torch.empty(bucket.split_numel, dtype=buffer.dtype, device=buffer.device)
        for i, offset in bucket.split:
            n = prod(layouts[i].shard_shape)
            local[offset:offset + n].copy_(params[layouts[i].mcore_name].detach().reshape(-1))
        _all_gather_flat(buffer[:tp * bucket.split_numel], local, tp_group)
        del local
    for i, offset in bucket.replicated:
        n = prod(layouts[i].shard_shape)
        buffer[offset:offset + n].copy_(params[layouts[i].mcore_name].detach().reshape(-1))


def _hf_tensors(buffer: torch.Tensor, bucket: _Bucket, per_rank: Sequence[Sequence[ShardLayout]], shapes: dict,
                tp: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Cut the gathered ``buffer`` into HF tensors, one parameter at a time, in layout order."""
    blocks_of = {i: [(r, r * bucket.split_numel + offset) for r in range(tp)] for i, offset in bucket.split}
    blocks_of.update({i: [(0, offset)] for i, offset in bucket.replicated})   # (TP rank, offset in the buffer)
    for i in sorted(blocks_of):
        blocks = blocks_of[i]
        names = list(dict.fromkeys(p.hf_name for r, _ in blocks for p in per_rank[r][i].pieces))
        hf = {n: torch.empty(shapes[n], dtype=buffer.dtype, device=buffer.device) for n in names}
        for r, offset in blocks:
            layout = per_rank[r][i]
            layout.scatter(buffer[offset:offset + prod(layout.shard_shape)].view(layout.shard_shape), hf)
        for name in names:
            yield name, hf.pop(name)


def stream_hf_tensors(model, spec, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every tensor of the HF checkpoint of ``model`` (a GPTModel stage, unwrapped),
    identical on every rank of its model-parallel group; dtype and device are the model's. ``bucket_bytes`` bounds
    the parameters gathered and broadcast at once (see the module docstring). A MoE model split over expert
    parallelism (EP > 1) streams each EP rank's experts in turn, its buckets broadcast from that rank over the stage's
    EP group before the pipeline broadcast: collective over the EP groups too, every EP rank gets every expert."""
    from megatron.core import parallel_state as ps

    tp, tp_group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp, pp_group = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_group()
    ep_group = expert_group(model)
    ep, ep_rank = (ep_group.size(), ep_group.rank()) if ep_group is not None else (1, 0)
    my_stage = ps.get_pipeline_model_parallel_rank()
    stage_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else [None]
    stages = all_gather_objects(_stage_facts(model), group=pp_group) if pp > 1 else [_stage_facts(model)]
    params = dict(model.named_parameters())
    sample = next(iter(params.values()))
    shapes = hf_tensor_shapes(spec)
    for stage, facts in enumerate(stages):
        for owner in range(ep):   # EP rank 0: the whole stage with its experts; the others: their experts only
            per_rank = [[layout for layout in stage_layouts(spec, tp_rank=r, tp=tp, padded_vocab=model.vocab_size,
                                                            ep_rank=owner, ep=ep, **facts)
                         if owner == 0 or layout.expert] for r in range(tp)]
            for indices in bucket_plan(per_rank, sample.element_size(), bucket_bytes):
                bucket = _Bucket.of(indices, per_rank[0], tp)
                buffer = torch.empty(bucket.numel, dtype=sample.dtype, device=sample.device)
                if stage == my_stage:
                    if ep_rank == owner:
                        _fill(buffer, bucket, per_rank[tp_rank], params, tp, tp_group)
                    if ep > 1:
                        dist.broadcast(buffer, src=dist.get_global_rank(ep_group, owner), group=ep_group)
                if pp > 1:
                    dist.broadcast(buffer, src=stage_ranks[stage], group=pp_group)
                yield from _hf_tensors(buffer, bucket, per_rank, shapes, tp)
                del buffer
