"""Rollouts on colocated vLLM replicas (generation/vllm_replica.py, vllm_rollouts.py) against our megatron decode.

A tiny random Qwen2 with head_dim 64 (vLLM's CPU attention has no head_dim 16) on 2 gloo ranks, laid out as DP=2
(TP=1), TP=2 and PP=2: vLLM's greedy responses equal the megatron KV-cached decode token for token; after an
optimizer step with a large learning rate the synced replica follows the new weights (and no longer gives the old
responses); the sampling law at temperature 1 and with top-k/top-p passes a chi-square test against the model's
softmax. The real vocabulary (259 of the config's 300 rows) is enforced throughout: the tiny model's random rows
beyond it would otherwise win often.

Each worker builds its replica once and keeps it for the session: vLLM's shutdown destroys the process group its
external-launcher world shares with the trainer, so a training job closes it last and a worker never does.
"""
from __future__ import annotations

import pytest
import torch
from harness import run_parallel
from tiny_models import make_tiny_hf_model

from megatron_tsdkd.generation import SamplingConfig

PROMPTS = [[5, 17, 33, 9, 100, 250, 31], [7, 8], [42, 43, 44, 45, 46], [3, 4, 5]]
REAL_VOCAB = 259            # the tiny tokenizer's size; the config has 300 rows
EOS, PAD = 2, 0
MAX_NEW = 12
HEAD_DIM_64 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192)
CHI2_P1E4 = {4: 23.51, 9: 33.72}   # chi-square quantiles at p = 1e-4 by degrees of freedom
STAT_ROWS = 2000

_replicas: dict = {}   # per worker process: hf dir -> VllmReplica (see the module docstring)


# The students users have: tied embeddings (every small Qwen2.5 / Qwen3, the paper's 1.5B student), untied ones
# (Llama 3, larger Qwen): vLLM keeps processed copies of some weights (its CPU build packs the output layer), and a
# tied output layer is never named in the weights it is fed.
STUDENTS = {"qwen2_tied": ("qwen2", True), "qwen2": ("qwen2", False), "qwen3_tied": ("qwen3", True),
            "llama": ("llama", False), "qwen3_moe": ("qwen3_moe", False)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_hf_model("qwen2", str(tmp_path_factory.mktemp("vllm") / "qwen2"), seed=21, **HEAD_DIM_64)


@pytest.fixture(scope="module")
def student_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vllm_students")
    # the MoE's experts 64 wide: vLLM's CPU build pads an expert's width to a multiple of 64 and then cannot
    # reload narrower ones (real experts are: Qwen3-30B-A3B's are 768)
    return {name: make_tiny_hf_model(arch, str(root / name), tie=tie, seed=31 + i, **HEAD_DIM_64,
                                     **({"head_dim": 64} if arch != "qwen2" else {}),
                                     **({"moe_intermediate_size": 64} if arch == "qwen3_moe" else {}))
            for i, (name, (arch, tie)) in enumerate(STUDENTS.items())}


# ---------------------------------------------------------------------------------------------------------------
# Code that runs on the ranks.

def _replica(path: str):
    from megatron_tsdkd.generation.vllm_replica import VllmReplica

    if path not in _replicas:
        _replicas[path] = VllmReplica(path, dtype=torch.float32, vocab_size=REAL_VOCAB, max_model_len=64,
                                      max_rows=STAT_ROWS, memory_fraction=0.3)
    return _replicas[path]


def _megatron_rollouts(model, path: str):
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_tsdkd.generation.vllm_rollouts import VllmRollouts
    from megatron_tsdkd.models.hf_config import arch_spec
    from megatron_tsdkd.models.weight_stream import stream_hf_tensors

    spec = arch_spec(AutoConfig.from_pretrained(path, local_files_only=True))
    return VllmRollouts(_replica(path), lambda: stream_hf_tensors(model, spec), (EOS,),
                        group=ps.get_model_parallel_group())


def _large_lr_step(model) -> None:
    """One SGD step with learning rate 50 on seeded gradients: replicated weights get the same gradient on every
    TP rank (seeded by name), split ones a different one per rank; a tied embedding's copy on the last pipeline
    stage gets its embedding's (megatron's embedding group all-reduces their gradients, so they stay equal)."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        split = getattr(param, "tensor_model_parallel", False)
        key = "shared_embedding" if getattr(param, "shared_embedding", False) else name
        g = torch.Generator().manual_seed(sum(map(ord, key)) + (1000 * tp_rank if split else 0))
        param.grad = 0.002 * torch.randn(param.shape, generator=g).to(param.dtype)
    torch.optim.SGD(model.parameters(), lr=50.0).step()


def _greedy_before_and_after_a_step(paths: dict) -> dict:
    return {name: _greedy_of_one_student(path) for name, path in paths.items()}


def _greedy_of_one_student(path: str) -> dict:
    from megatron_tsdkd.generation import generate
    from test_generation import _load

    model = _load(path)
    config = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW)

    def megatron():
        return generate(model, PROMPTS, config, eos_token_ids=(EOS,), pad_token_id=PAD,
                        vocab_size=REAL_VOCAB).responses

    rollouts = _megatron_rollouts(model, path)
    out = {"megatron": megatron()}
    vllm, out["sync_seconds"] = rollouts.generate(PROMPTS, config, generator_seed=0)
    out["vllm"], out["finished"] = vllm.responses, vllm.finished
    _large_lr_step(model)
    rollouts.weights_changed()
    out["megatron_after"] = megatron()
    vllm, _ = rollouts.generate(PROMPTS, config, generator_seed=0)
    out["vllm_after"] = vllm.responses
    return out


def _one_token_counts(path: str, settings: dict) -> list[int]:
    """Counts over the real vocabulary of STAT_ROWS one-token samples after PROMPTS[0], one seed per row."""
    from safetensors.torch import load_file

    replica = _replica(path)
    replica.load_weights(load_file(f"{path}/model.safetensors").items())
    config = SamplingConfig(max_new_tokens=1, num_samples=STAT_ROWS, **settings)
    out = replica.generate([PROMPTS[0]], config, eos_token_ids=(EOS,), seeds=list(range(STAT_ROWS)))
    counts = [0] * REAL_VOCAB
    for response in out.responses:
        counts[response[0]] += 1
    return counts


# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 2), (2, 1, 1), (1, 2, 1)], ids=["dp2_ep2", "tp2", "pp2"])
def test_vllm_greedy_equals_megatron_decode_and_follows_a_large_lr_step(student_dirs, tp, pp, ep):
    """Tied and untied Qwen2, a tied Qwen3, an untied Llama and a Qwen3-MoE (its experts split over both ranks at
    DP=2: each replica is fed every expert): the replica's greedy responses are our decode's, token for token,
    before and after a step that changes them."""
    results = run_parallel(_greedy_before_and_after_a_step, student_dirs, world_size=2, tp=tp, pp=pp, ep=ep)
    for name in STUDENTS:
        for rank, per_student in enumerate(results):
            r = per_student[name]
            assert r["vllm"] == r["megatron"], f"{name} rank {rank}: vLLM {r['vllm']} != megatron {r['megatron']}"
            assert r["vllm_after"] == r["megatron_after"], f"{name} rank {rank} after the step"
            assert r["megatron_after"] != r["megatron"], f"{name}: the step must change the greedy responses"
            assert r["finished"] == [bool(x) and x[-1] == EOS for x in r["vllm"]]
            assert all(t < REAL_VOCAB for row in r["vllm"] + r["vllm_after"] for t in row)
            assert r["sync_seconds"] > 0
        assert results[0][name]["vllm"] == results[1][name]["vllm"]   # both ranks: the group's (or DP rank's) rows


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=10, top_p=0.9)],
                         ids=["t1", "topk_topp"])
def test_vllm_sampling_law_matches_the_softmax(tiny_dir, settings):
    from transformers import AutoModelForCausalLM

    from megatron_tsdkd.generation.token_selection import filter_top_k_top_p

    counts = torch.tensor(run_parallel(_one_token_counts, tiny_dir, settings, world_size=1)[0], dtype=torch.float64)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits[0, -1, :REAL_VOCAB].double()
    probs = filter_top_k_top_p(logits[None] / settings["temperature"], settings.get("top_k", 0),
                               settings.get("top_p", 1.0)).softmax(-1)[0]
    assert counts[probs == 0].sum() == 0, "a token outside top-k/top-p was drawn"
    expected = probs * STAT_ROWS
    # the categories expected at least 5 times, the rest pooled into one
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    assert 3 <= df, f"too few categories for a test ({df + 1})"
    bound = CHI2_P1E4.get(df) or df + 4.75 * (2 * df) ** 0.5   # p ~ 1e-4 (normal approximation beyond the table)
    assert chi2 < bound, f"chi-square {chi2:.1f} >= {bound:.1f} ({df} degrees of freedom)"


def _prompt_too_long(path: str) -> str:
    """A real vLLM failure mid-run (a prompt beyond the replica's max_model_len) through the rollout driver."""
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.generation.vllm_rollouts import RolloutEngineError, VllmRollouts

    replica = _replica(path)
    rollouts = VllmRollouts(replica, lambda: iter(()), (EOS,), group=ps.get_model_parallel_group())
    rollouts.stale = False   # nothing to sync: the failure is in the sampling
    try:
        rollouts.generate([list(range(3, 103))], SamplingConfig(max_new_tokens=4),
                          generator_seed=0)
    except RolloutEngineError as error:
        return str(error)
    return "no error"


def test_a_vllm_failure_mid_run_is_one_line_naming_the_setting(tiny_dir):
    message = run_parallel(_prompt_too_long, tiny_dir, world_size=1)[0]
    assert message.startswith("rollout.engine=vllm: the vLLM replica failed while sampling (VLLMValidationError: "), message
    assert "set rollout.engine=megatron" in message and "\n" not in message


def test_memory_plan_counts_the_replica_and_refuses_a_share_too_small_for_the_student():
    import os

    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.planning.memory_plan import MemoryPlanError, load_hf_spec
    from megatron_tsdkd.planning.memory_gate import check_memory_plan

    root = os.path.join(os.path.dirname(__file__), "..")
    config = os.path.join(root, "configs", "tsdkd_70b_to_7b.yaml")
    student, _ = load_hf_spec(os.path.join(root, "configs", "hf", "Qwen2.5-7B-Instruct"), "student")
    teacher, _ = load_hf_spec(os.path.join(root, "configs", "hf", "Qwen2.5-72B-Instruct"), "teacher")

    def plan(*overrides):
        return check_memory_plan(load_config(config, list(overrides)), 16, student, teacher)

    vllm, megatron = plan("rollout.engine=vllm"), plan("rollout.engine=megatron")
    share = vllm.row("vLLM replica: weights")
    assert share.phase == "rollout" and share.bytes_per_stage == [int(0.3 * 80 * 1024**3)] * 2
    assert not any(r.name.startswith("vLLM") for r in megatron.rows)
    assert any(r.name == "student KV cache" for r in megatron.rows)
    assert max(vllm.peaks) > max(megatron.peaks)
    # 0.1 x 80 GiB = 8 GiB cannot hold the 7B student's 14.2 GiB of bf16 weights
    with pytest.raises(MemoryPlanError, match=r"^rollout\.vllm_memory_fraction: 0\.1 of 80 GiB"):
        plan("rollout.engine=vllm", "rollout.vllm_memory_fraction=0.1")
