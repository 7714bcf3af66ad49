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
    z = torch.zeros(2, device="cuda")
    assert z.device.type == "cpu"
    x = torch.ones(4, 2)
    col = tensor_parallel.ColumnParallelLinear(
        2, 4, config=_tiny_config(), init_method=torch.nn.init.ones_, bias=False, gather_output=True)
    y, _ = col(x)
    return a, y


def _tiny_config():
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core import parallel_state as ps
    return ModelParallelConfig(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                               use_cpu_initialization=True)


def test_cpu_shim_runs_megatron_tensor_parallel_layers():
    (a0, y0), (a1, y1) = run_parallel(_shimmed_megatron_pieces, world_size=2, tp=2)
    assert torch.equal(y0, torch.full((4, 4), 2.0)) and torch.equal(y0, y1)
    assert a0.shape == (3,)


def test_layout_not_dividing_world_is_refused():
    from megatron_tsdkd.runtime import ParallelLayout
    import pytest
    with pytest.raises(ValueError, match="not divisible by tensor\\(4\\)"):
        ParallelLayout(tensor=4, pipeline=2).data_parallel(4)
