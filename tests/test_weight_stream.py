"""The vLLM weight sync's stream (models/weight_stream.py) at TP=2 x PP=2 on 4 gloo processes.

Tiny tied Qwen2, Qwen3 (q/k norms) and Llama 3 with a wider MLP (so one layer outweighs the padded embedding),
streamed with a small bucket (several buckets per stage, some parameters larger than a bucket) and a large one (one
bucket per stage). (a) Every rank receives exactly the HF checkpoint, in one order, each name once, the tied output
layer not sent. (b) The collectives one stream issues, counted per kind by wrapping torch.distributed's functions:
one broadcast per bucket of every stage, at most one TP all-gather per bucket of the rank's own stage, one object
all-gather of the stage facts, nothing else; far fewer than the one-per-parameter stream it replaced. (c) No buffer
the stream allocates (every new storage, seen by a dispatch mode) exceeds the bucket or the largest parameter.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from math import prod

import torch
import torch.distributed as dist
from harness import run_parallel
from tiny_models import make_tiny_hf_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

TP, PP = 2, 2
PADDED_VOCAB = 512                      # 300 rows padded to a multiple of 128 x TP
WIDE = dict(intermediate_size=512)      # linear_fc1 (256 KiB in fp32) is the largest parameter
SMALL, LARGE = 64 * 1024, 1 << 30       # bytes: several buckets per stage / one bucket per stage
ARCHS = {"qwen2_tied": ("qwen2", True), "qwen3": ("qwen3", False), "llama": ("llama", False)}
COUNTED = ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base", "broadcast",
           "all_gather_object", "broadcast_object_list", "gather_object", "all_reduce", "reduce", "gather",
           "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv",
           "isend", "irecv", "batch_isend_irecv", "barrier")


# ---------------------------------------------------------------------------------------------------------------
# Code that runs on the ranks.

@contextlib.contextmanager
def _counting_collectives(counts: Counter):
    """Count each call of a torch.distributed collective made through the ``torch.distributed`` namespace."""
    originals = {name: getattr(dist, name) for name in COUNTED if hasattr(dist, name)}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


class _LargestAllocation(TorchDispatchMode):
    """The bytes of the largest storage any op creates (an output whose storage none of the inputs shares)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _one_stream(model, spec, **kwargs) -> dict:
    """One full stream as a consumer sees it (each tensor copied away outside the measurement)."""
    from megatron_tsdkd.models.weight_stream import stream_hf_tensors

    counts, allocations, pairs = Counter(), _LargestAllocation(), []
    with _counting_collectives(counts):
        stream = stream_hf_tensors(model, spec, **kwargs)
        while True:
            with allocations:
                item = next(stream, None)
            if item is None:
                break
            pairs.append((item[0], item[1].clone()))
    return {"order": [n for n, _ in pairs], "tensors": dict(pairs), "counts": dict(counts),
            "largest_allocation": allocations.largest}


def _streams(paths: dict, bucket_sizes: list) -> dict:
    """Per arch and bucket size (None: the function's default): what ``_one_stream`` saw on this rank."""
    from megatron.core import parallel_state as ps
    from test_generation import _load
    from transformers import AutoConfig

    from megatron_tsdkd.models.hf_config import arch_spec

    out = {"stage": ps.get_pipeline_model_parallel_rank()}
    for arch, path in paths.items():
        model = _load(path)
        spec = arch_spec(AutoConfig.from_pretrained(path, local_files_only=True))
        out[arch] = {size: _one_stream(model, spec, **({} if size is None else {"bucket_bytes": size}))
                     for size in bucket_sizes}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The tests

def test_weight_stream_is_the_hf_checkpoint_in_few_collectives_and_bounded_buffers(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_tsdkd.models.hf_config import arch_spec
    from megatron_tsdkd.models.mapping import stage_layouts
    from megatron_tsdkd.models.weight_stream import bucket_plan

    paths = {name: make_tiny_hf_model(arch, str(tmp_path / name), tie=tie, seed=3 + i, **WIDE)
             for i, (name, (arch, tie)) in enumerate(ARCHS.items())}
    results = run_parallel(_streams, paths, [SMALL, LARGE], world_size=TP * PP, tp=TP, pp=PP)
    for arch, path in paths.items():
        reference = load_file(f"{path}/model.safetensors")
        if ARCHS[arch][1]:   # tied: the output layer is the embedding, not sent again
            reference.pop("lm_head.weight", None)
        spec = arch_spec(AutoConfig.from_pretrained(path, local_files_only=True))
        stages = [[stage_layouts(spec, tp_rank=r, tp=TP, layer_numbers=[s], pre_process=s == 0,
                                 post_process=s == PP - 1, padded_vocab=PADDED_VOCAB, has_output_weight=s == PP - 1)
                   for r in range(TP)] for s in range(PP)]
        exported = [[i for i, layout in enumerate(per_rank[0]) if layout.export] for per_rank in stages]
        # what the one-collective-per-parameter stream issued: a gather per split parameter, a broadcast per tensor
        per_parameter = [1 + len(reference) + sum(stages[s][0][i].tp_split for i in exported[s]) for s in range(PP)]
        largest_param = 4 * max(prod(layout.shard_shape) * (TP if layout.tp_split else 1)
                                for per_rank in stages for layout in per_rank[0])
        for size in (SMALL, LARGE):
            plans = [bucket_plan(per_rank, 4, size) for per_rank in stages]
            for s, plan in enumerate(plans):   # the plan: every exported parameter once, in order, within the bucket
                assert [i for bucket in plan for i in bucket] == exported[s], (arch, size, s)
                for bucket in plan:
                    nbytes = sum(4 * prod(stages[s][0][i].shard_shape) * (TP if stages[s][0][i].tp_split else 1)
                                 for i in bucket)
                    assert nbytes <= size or len(bucket) == 1, (arch, size, s, bucket)
            if size == SMALL:
                assert all(len(plan) >= 3 for plan in plans), (arch, [len(p) for p in plans])
            else:
                assert all(len(plan) == 1 for plan in plans), (arch, [len(p) for p in plans])
            buckets = sum(len(plan) for plan in plans)
            for rank, result in enumerate(results):
                got, stage = result[arch][size], result["stage"]
                # (a) the HF checkpoint, tensor for tensor, in one order on every rank
                assert len(got["order"]) == len(set(got["order"])), (arch, size, rank)
                assert got["order"] == results[0][arch][size]["order"], (arch, size, rank)
                assert set(got["tensors"]) == set(reference), (arch, size, rank, set(got["tensors"]) ^ set(reference))
                for name, tensor in reference.items():
                    assert torch.equal(got["tensors"][name], tensor), (arch, size, rank, name)
                # (b) one broadcast per bucket, at most one TP gather per bucket of the own stage, one object gather
                counts = Counter(got["counts"])
                assert counts.pop("broadcast") == buckets, (arch, size, rank, got["counts"])
                gathers = counts.pop("all_gather_single", 0) + counts.pop("all_gather_into_tensor", 0)
                assert 1 <= gathers <= len(plans[stage]), (arch, size, rank, got["counts"])
                assert counts.pop("all_gather_object") == 1, (arch, size, rank, got["counts"])
                assert not counts, (arch, size, rank, got["counts"])
                total = sum(got["counts"].values())
                assert total <= buckets + len(plans[stage]) + 1 < per_parameter[stage], (arch, size, rank, total)
                if size == LARGE:
                    assert 5 * total <= per_parameter[stage], (arch, rank, got["counts"], per_parameter[stage])
                # (c) no buffer beyond a bucket or the largest parameter (gathered, vocabulary padding included)
                assert got["largest_allocation"] <= max(size, largest_param), \
                    (arch, size, rank, got["largest_allocation"])
