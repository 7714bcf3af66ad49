"""megatron-core models built from tiny Hugging Face configs reproduce transformers' logits at TP/PP layouts.

Every layout loads the same safetensors through ``load_hf_weights`` (sliced per rank) and is compared with
transformers on the same weights, fp32, to 1e-5. Vocabulary padding, tied embeddings on a separate last stage,
Qwen2 qkv bias, Qwen3 q/k norm with head_dim != hidden/heads and Llama 3 rope scaling are all in the mix.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from harness import run_parallel, run_serial
from tiny_models import VOCAB_SIZE, make_tiny_hf_model, tiny_config

from megatron_tsdkd.models import (
    ParallelLayoutError,
    UnsupportedModelError,
    arch_spec,
    check_parallel_layout,
    padded_vocab_size,
    read_hf_config,
)
from megatron_tsdkd.models.mapping import hf_tensor_shapes, stage_layouts

CASES = {"qwen2": ("qwen2", False), "qwen3_tied": ("qwen3", True), "llama3": ("llama", False)}
TOLERANCE = 1e-5
BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: make_tiny_hf_model(arch, str(root / name), tie=tie, seed=i, tokenizer=False)
            for i, (name, (arch, tie)) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def hf_logits(tiny_dirs, input_ids) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    out = {}
    with torch.no_grad():
        for name, path in tiny_dirs.items():
            out[name] = AutoModelForCausalLM.from_pretrained(path).eval()(input_ids).logits
    return out


# ---------------------------------------------------------------------------------------------------------------
# Code that runs on the ranks (module level so the worker pool can import it).

def _forward_logits(model, input_ids: torch.Tensor):
    """Full-vocabulary logits [b, s, V_padded] on the last stage (None elsewhere), through megatron's pipeline
    schedule when PP > 1; the TP shards are all-gathered (test only: the trainer keeps them sharded)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() == 1:
            logits = model(input_ids, position_ids, attention_mask=None)
        else:
            def forward_step(data_iterator, model):
                ids, pos = next(data_iterator)
                output = model(ids, pos, attention_mask=None)
                return output, lambda out, non_loss_data=False: out

            collected = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([(input_ids, position_ids)]), model=[model],
                num_microbatches=1, seq_length=input_ids.shape[1], micro_batch_size=input_ids.shape[0],
                forward_only=True, collect_non_loss_data=True)
            if not ps.is_pipeline_last_stage():
                return None
            logits = collected[0]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        shards = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(shards, dim=-1)
    return logits if ps.get_tensor_model_parallel_rank() == 0 else None


def megatron_logits(tiny_dirs: dict, input_ids: torch.Tensor, padded_vocab: int | None = None) -> dict:
    from megatron_tsdkd.models import build_model, load_hf_weights, read_hf_config

    out = {}
    for name, path in tiny_dirs.items():
        torch.manual_seed(0)
        model = build_model(read_hf_config(path), padded_vocab_size=padded_vocab)
        load_hf_weights(model, path)
        model.eval()
        out[name] = _forward_logits(model, input_ids)
    return out


def _check_against_hf(results: list[dict], hf_logits: dict, padded_vocab: int) -> dict[str, float]:
    """Exactly one rank (the last stage's TP rank 0) returns logits; padded columns are exactly zero."""
    diffs = {}
    for name, reference in hf_logits.items():
        got = [r[name] for r in results if r[name] is not None]
        assert len(got) == 1, f"{name}: {len(got)} ranks returned logits"
        logits = got[0]
        assert logits.shape == (BATCH, SEQ, padded_vocab), logits.shape
        assert torch.count_nonzero(logits[..., VOCAB_SIZE:]) == 0, f"{name}: padded vocabulary rows are not zero"
        diffs[name] = (logits[..., :VOCAB_SIZE] - reference).abs().max().item()
    print("max |megatron - transformers| logits:", {k: f"{v:.2e}" for k, v in diffs.items()})
    bad = {k: v for k, v in diffs.items() if v > TOLERANCE}
    assert not bad, f"logits differ from transformers by more than {TOLERANCE}: {bad}"
    return diffs


# ---------------------------------------------------------------------------------------------------------------
# Layouts

def test_logits_match_transformers_tp1(tiny_dirs, input_ids, hf_logits):
    _check_against_hf([run_serial(megatron_logits, tiny_dirs, input_ids)], hf_logits, padded_vocab_size(VOCAB_SIZE, 1))


def test_logits_match_transformers_tp2(tiny_dirs, input_ids, hf_logits):
    results = run_parallel(megatron_logits, tiny_dirs, input_ids, world_size=2, tp=2, pp=1)
    _check_against_hf(results, hf_logits, padded_vocab_size(VOCAB_SIZE, 2))


def test_logits_match_transformers_tp2_with_a_common_padded_vocab(tiny_dirs, input_ids, hf_logits):
    """The trainer lays teacher and student on one padded vocabulary larger than either model's default."""
    results = run_parallel(megatron_logits, tiny_dirs, input_ids, 640, world_size=2, tp=2, pp=1)
    _check_against_hf(results, hf_logits, 640)


def test_logits_match_transformers_pp2(tiny_dirs, input_ids, hf_logits):
    results = run_parallel(megatron_logits, tiny_dirs, input_ids, world_size=2, tp=1, pp=2)
    _check_against_hf(results, hf_logits, padded_vocab_size(VOCAB_SIZE, 1))


def test_logits_match_transformers_tp2_pp2(tiny_dirs, input_ids, hf_logits):
    results = run_parallel(megatron_logits, tiny_dirs, input_ids, world_size=4, tp=2, pp=2)
    _check_against_hf(results, hf_logits, padded_vocab_size(VOCAB_SIZE, 2))


def test_llama3_rope_scaling_is_visible_in_the_logits(tiny_dirs, input_ids, hf_logits):
    """Guards the llama3 comparison: without the scaling, transformers' own logits move by far more than 1e-5."""
    from transformers import AutoModelForCausalLM

    config = read_hf_config(tiny_dirs["llama3"])
    config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    unscaled = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama3"], config=config).eval()
    with torch.no_grad():
        moved = (unscaled(input_ids).logits - hf_logits["llama3"]).abs().max().item()
    assert moved > 100 * TOLERANCE, moved


# ---------------------------------------------------------------------------------------------------------------
# Config checks and the mapping, without processes

def test_padded_vocab_size():
    assert padded_vocab_size(151936, 1) == 151936
    assert padded_vocab_size(151936, 2) == 152064
    assert padded_vocab_size(152064, 8) == 152576
    assert padded_vocab_size(300, 1) == 384 and padded_vocab_size(300, 2) == 512


@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("qwen3", True), ("llama", True)])
def test_mapping_splits_and_reassembles_every_tensor(arch, tie):
    """Shards built from HF tensors for every TP rank and PP stage scatter back to the same HF tensors."""
    spec = arch_spec(tiny_config(arch, tie=tie))
    shapes = hf_tensor_shapes(spec)
    source = {n: torch.randn(s) for n, s in shapes.items()}
    tp, pp, padded = 2, 2, padded_vocab_size(spec.vocab_size, 2)
    rebuilt = {n: torch.full(s, float("nan")) for n, s in shapes.items()}
    per_stage = spec.num_layers // pp
    for stage in range(pp):
        for r in range(tp):
            layouts = stage_layouts(spec, tp_rank=r, tp=tp, layer_numbers=range(stage * per_stage,
                                    (stage + 1) * per_stage), pre_process=stage == 0, post_process=stage == pp - 1,
                                    padded_vocab=padded, has_output_weight=not (tie and pp == 1))
            for layout in layouts:
                shard = layout.assemble(lambda p: source[p.hf_name][p.index()], torch.float32)
                assert tuple(shard.shape) == layout.shard_shape
                if layout.export:
                    layout.scatter(shard, rebuilt)
    for name in shapes:
        assert torch.equal(rebuilt[name], source[name]), name


def test_qkv_shard_is_interleaved_per_query_group():
    """TP rank 1 of a 4-head, 2-group model holds [q2 q3 k1 v1] rows of width head_dim."""
    spec = arch_spec(tiny_config("qwen2"))
    (qkv,) = [lay for lay in stage_layouts(spec, tp_rank=1, tp=2, layer_numbers=[0], pre_process=False,
              post_process=False, padded_vocab=512, has_output_weight=False) if lay.mcore_name.endswith("qkv.weight")]
    hd = spec.head_dim
    assert [(p.hf_name.split(".")[-2], p.start // hd, p.stop // hd) for p in qkv.pieces] == [
        ("q_proj", 2, 4), ("k_proj", 1, 2), ("v_proj", 1, 2)]


def _write_config(folder, **fields) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(fields, f)
    return str(folder)


def test_unsupported_architectures_are_named(tmp_path):
    gpt2 = _write_config(tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' \\(GPT2LMHeadModel\\) in .* is not supported"):
        read_hf_config(gpt2)
    unknown = _write_config(tmp_path / "custom", model_type="my_lm")  # unknown to transformers as well
    with pytest.raises(UnsupportedModelError, match="model_type 'my_lm' \\(no architectures entry\\)"):
        read_hf_config(unknown)
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        arch_spec(tiny_config("qwen2", use_sliding_window=True))
    with pytest.raises(UnsupportedModelError, match="original_max_position_embeddings"):
        llama = tiny_config("llama")
        llama.rope_parameters = {**llama.rope_parameters, "original_max_position_embeddings": 4096}
        arch_spec(llama)
    with pytest.raises(UnsupportedModelError, match="rope_type 'yarn'"):
        qwen = tiny_config("qwen2")
        qwen.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                "original_max_position_embeddings": 1024}
        arch_spec(qwen)


def test_parallel_layout_errors_name_the_culprit():
    config = tiny_config("qwen2")  # 4 heads, 2 query groups, ffn 96, 2 layers, vocab 300
    check_parallel_layout(config, 2, 2)
    with pytest.raises(ParallelLayoutError, match="4 attention heads are not divisible by tensor parallel 3"):
        check_parallel_layout(config, 3, 1)
    with pytest.raises(ParallelLayoutError, match="2 key/value heads .* not divisible by tensor parallel 4"):
        check_parallel_layout(config, 4, 1)
    with pytest.raises(ParallelLayoutError, match="2 layers are not divisible by pipeline parallel 3"):
        check_parallel_layout(config, 1, 3)
    with pytest.raises(ParallelLayoutError, match="padded vocabulary 301 .* divisible by tensor parallel 2"):
        check_parallel_layout(config, 2, 1, padded_vocab=301)
    with pytest.raises(ParallelLayoutError, match="padded vocabulary 256 must be >= vocab_size 300"):
        check_parallel_layout(config, 1, 1, padded_vocab=256)
