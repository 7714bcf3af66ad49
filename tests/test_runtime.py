"""The runtime: process groups from the environment, and the CPU shim that lets megatron-core run without CUDA."""
import torch
import torch.distributed as dist

from harness import run_parallel


def _layout_and_collectives():
    from megatron.core import parallel_state as ps

    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
    return dict(
        rank=dist.get_rank(), tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        tp_sum=x.item(),
    )


def test_layouts_on_four_processes():
    for tp, pp in [(2, 2), (4, 1), (1, 4), (2, 1)]:
        out = run_parallel(_layout_and_collectives, world_size=4, tp=tp, pp=pp)
        assert [o["tp"] for o in out] == [tp] * 4
        assert [o["pp"] for o in out] == [pp] * 4
        assert [o["dp"] for o in out] == [4 // (tp * pp)] * 4
        # megatron orders ranks TP-fastest: TP groups are consecutive ranks
        for o in out:
            first = o["rank"] - o["tp_rank"]
            assert o["tp_sum"] == sum(r + 1 for r in range(first, first + tp))


def _shimmed_megatron_pieces():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron_tsdkd.runtime import cpu_shim

    assert cpu_shim.is_applied()
    with get_cuda_rng_tracker().fork():
        a = torch.randn(3)
    assert a.shape == (3,)
    z = torch.zeros(2, device="cuda")
    assert z.device.type == "cpu"
    x = torch.ones(4, 2)
    col = tensor_parallel.ColumnParallelLinear(
        2, 4, config=_tiny_config(), init_method=torch.nn.init.ones_, bias=False, gather_output=True)
    y, _ = col(x)
    return y


def _tiny_config():
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core import parallel_state as ps
    return ModelParallelConfig(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                               use_cpu_initialization=True)


def test_cpu_shim_runs_megatron_tensor_parallel_layers():
    y0, y1 = run_parallel(_shimmed_megatron_pieces, world_size=2, tp=2)
    assert torch.equal(y0, torch.full((4, 4), 2.0)) and torch.equal(y0, y1)


def _rng_streams(seed: int) -> dict:
    """Draws from each stream megatron's RNG tracker keeps, after seeding it as init_distributed does."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    from megatron.core.tensor_parallel.random import _DATA_PARALLEL_RNG_TRACKER_NAME, _MODEL_PARALLEL_RNG_TRACKER_NAME

    def draws(seed_to_use: int) -> dict:
        model_parallel_cuda_manual_seed(seed_to_use)
        tracker = get_cuda_rng_tracker()
        default_first = torch.randn(4)
        with tracker.fork():   # the default fork is the model-parallel stream (e.g. dropout inside TP regions)
            model_parallel = torch.randn(4)
        with tracker.fork(_MODEL_PARALLEL_RNG_TRACKER_NAME):
            model_parallel_next = torch.randn(4)
        with tracker.fork(_DATA_PARALLEL_RNG_TRACKER_NAME):
            data_parallel = torch.randn(4)
        default_second = torch.randn(4)   # forking must neither read nor move the default stream
        return dict(default=torch.cat([default_first, default_second]), model_parallel=model_parallel,
                    model_parallel_next=model_parallel_next, data_parallel=data_parallel)

    first = draws(seed)
    return dict(rank=dist.get_rank(), tp_rank=ps.get_tensor_model_parallel_rank(), first=first,
                again=draws(seed), other_seed=draws(seed + 1), unforked=_default_only(seed))


def _default_only(seed: int) -> torch.Tensor:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    return torch.randn(8)


def test_rng_tracker_streams_follow_tensor_parallel_ranks():
    """Default and data-parallel streams agree across TP ranks; the model-parallel stream differs per TP rank
    and agrees across data-parallel replicas; reseeding reproduces every stream; a fork leaves the default alone."""
    seed = 77
    out = run_parallel(_rng_streams, seed, world_size=4, tp=2)   # TP groups {0,1} {2,3}; DP replicas {0,2} {1,3}
    assert [o["tp_rank"] for o in out] == [0, 1, 0, 1]
    for o in out:
        for stream, values in o["first"].items():
            assert torch.equal(values, o["again"][stream]), f"rank {o['rank']}: reseeding changed {stream}"
            assert not torch.equal(values, o["other_seed"][stream]), f"rank {o['rank']}: seed ignored by {stream}"
        assert torch.equal(o["first"]["default"], o["unforked"]), "a fork moved the default stream"
        assert not torch.equal(o["first"]["model_parallel"], o["first"]["model_parallel_next"]), \
            "a fork did not advance its own stream"
    ref = out[0]["first"]
    for o in out[1:]:
        for stream in ("default", "data_parallel"):
            assert torch.equal(o["first"][stream], ref[stream]), f"rank {o['rank']}: {stream} differs from rank 0"
    for replica in (out[2], out[3]):
        twin = out[replica["tp_rank"]]
        assert torch.equal(replica["first"]["model_parallel"], twin["first"]["model_parallel"]), \
            "the model-parallel stream differs across data-parallel replicas"
    assert not torch.equal(out[0]["first"]["model_parallel"], out[1]["first"]["model_parallel"]), \
        "TP ranks draw the same model-parallel numbers"
    assert not torch.equal(out[0]["first"]["model_parallel"], ref["default"][:4]), \
        "the model-parallel stream is the default stream"
    # Seeds as megatron defines them: default = seed, model-parallel = seed + 2718 + tp_rank.
    for o in out:
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(o["first"]["default"][:4], torch.randn(4, generator=gen))
        gen = torch.Generator().manual_seed(seed + 2718 + o["tp_rank"])
        assert torch.equal(o["first"]["model_parallel"], torch.randn(4, generator=gen))


def test_layout_not_dividing_world_is_refused():
    from megatron_tsdkd.runtime import ParallelLayout
    import pytest
    with pytest.raises(ValueError, match="not divisible by tensor\\(4\\)"):
        ParallelLayout(tensor=4, pipeline=2).data_parallel(4)


def _draws_after_init() -> dict:
    """What a test sees right after the harness initialised its layout: one draw from each RNG stream."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        model_parallel = torch.randn(4)
    return dict(default=torch.randn(4), model_parallel=model_parallel)


def test_reinitialising_a_layout_reseeds_like_a_fresh_one():
    """init_distributed keeps megatron's groups when the layout is unchanged; the RNG state it leaves must still
    be a fresh initialisation's, whether the groups were kept or rebuilt."""
    first = run_parallel(_draws_after_init, world_size=2, tp=2)
    kept = run_parallel(_draws_after_init, world_size=2, tp=2)       # same layout: groups kept
    run_parallel(_draws_after_init, world_size=2, tp=1)
    rebuilt = run_parallel(_draws_after_init, world_size=2, tp=2)    # after a change: groups rebuilt
    for rank in range(2):
        for stream in ("default", "model_parallel"):
            assert torch.equal(first[rank][stream], kept[rank][stream]), (rank, stream, "kept groups")
            assert torch.equal(first[rank][stream], rebuilt[rank][stream]), (rank, stream, "rebuilt groups")
    assert not torch.equal(first[0]["model_parallel"], first[1]["model_parallel"])
