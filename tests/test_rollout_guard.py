"""The rollout guard (engines/rollout_guard.py, losses/rollout_drift.py): the rollout engine's log-probabilities of
the tokens it sampled against the trainer's own, on every on-policy step.

- the statistic: exact against a direct computation, TP=2 equal to TP=1, 0 for identical log-probabilities;
- the guard's rule: it stops after ``patience`` steps above the bound in a row, one line naming rollout.engine;
- training runs on a tied-embedding pair (the students vLLM got wrong): ~0 with our decode, small with a correct
  vLLM replica, and a replica whose weight sync is skipped (it keeps vLLM's start-up weights) stops the run.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from harness import run_parallel

from megatron_tsdkd.losses.rollout_drift import rollout_drift
from megatron_tsdkd.engines.rollout_guard import DIFF, KL, RolloutDriftError, RolloutGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
DEMO_TOKENIZER = os.path.join(ROOT, "megatron_tsdkd", "assets", "demo", "teacher")


def _inputs(seed=0, batch=3, seq=7, vocab=50):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g)
    labels = torch.randint(0, 40, (batch, seq), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.3).float()
    return logits, labels, mask


def test_drift_sums_match_a_direct_computation():
    logits, labels, mask = _inputs()
    exact = logits[..., :40].log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    noise = 0.3 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(1))
    sums = rollout_drift(logits, labels, mask, (exact + noise) * mask, vocab_size=40)
    d = -noise[mask != 0]
    expected = torch.stack([d.abs().sum(), (d.exp() - 1 - d).sum(), torch.tensor(float(d.numel()))])
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    zero = rollout_drift(logits, labels, mask, exact * mask, vocab_size=40)
    assert zero[0] < 1e-5 and zero[1] < 1e-6 and zero[2] == mask.sum()


def _drift_at(tp_size: int) -> list:
    from megatron.core import parallel_state as ps

    logits, labels, mask = _inputs(seed=3, vocab=64)
    rank, width = ps.get_tensor_model_parallel_rank(), 64 // tp_size
    rollout = torch.zeros_like(mask) - 1.0
    shard = logits[..., rank * width:(rank + 1) * width].contiguous()
    return rollout_drift(shard, labels, mask, rollout, ps.get_tensor_model_parallel_group(), 40).tolist()


def test_drift_at_tp2_equals_tp1():
    serial = run_parallel(_drift_at, 1, world_size=1)[0]
    for sums in run_parallel(_drift_at, 2, world_size=2, tp=2):
        assert sums == pytest.approx(serial, rel=1e-5)


def test_guard_stops_after_patience_steps_in_a_row_with_one_line():
    guard = RolloutGuard("vllm", max_diff=0.5, patience=2)
    assert guard.observe(1, torch.tensor([1.0, 0.1, 10.0])) == pytest.approx({DIFF: 0.1, KL: 0.01})
    guard.observe(2, torch.tensor([60.0, 9.0, 10.0]))          # one strike
    guard.observe(3, torch.tensor([1.0, 0.0, 10.0]))           # reset
    guard.observe(4, torch.tensor([60.0, 9.0, 10.0]))
    with pytest.raises(RolloutDriftError) as stop:
        guard.observe(5, torch.tensor([70.0, 9.0, 10.0]))
    message = str(stop.value)
    assert message.startswith("rollout.engine=vllm: ") and "\n" not in message
    assert "rollout.max_logprob_diff=0.5" in message and "2 on-policy steps in a row (up to step 5)" in message
    assert "set rollout.engine=megatron" in message
    quiet = RolloutGuard("vllm", max_diff=0.5, patience=0)   # patience 0: log only
    for step in range(5):
        assert quiet.observe(step, torch.tensor([70.0, 9.0, 10.0]))[DIFF] == 7.0


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory):
    """A tiny Qwen2 pair with head_dim 64 (vLLM's CPU attention), the student's embeddings TIED, the demo tokenizer
    (3 rows short of the models' vocabulary), and arithmetic data. Weights drawn with std 0.2 so the student's
    next-token distributions are peaked, as a trained model's are (at the usual 0.02 a random model is nearly
    uniform, and so are vLLM's start-up weights: they would look alike)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from megatron_tsdkd.data.arithmetic_chains import make_problems

    root = tmp_path_factory.mktemp("guard_pair")
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    torch.manual_seed(0)
    for name, layers, tied in (("teacher", 2, False), ("student", 2, True)):
        Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok) + 3, hidden_size=128, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    with open(root / "train.jsonl", "w") as f:
        for p in make_problems(seed=7, count=40):
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution, "answer": p.answer}) + "\n")
    return str(root)


def _overrides(pair: str, tmp: str, *extra) -> list[str]:
    return [f"models.student.path={pair}/student", f"models.teacher.path={pair}/teacher",
            f"data.train={pair}/train.jsonl", "data.eval=", "checkpoint.export_hf=", "data.max_length=64",
            "data.max_prompt_length=40", "rollout.max_new_tokens=12", "batch.global_size=4", "batch.micro_size=2",
            "schedule.max_steps=3", "checkpoint.interval=0", "checkpoint.resume=none", "optimizer.lr=3e-3",
            "logging.interval=1", "logging.progress_bar=false", "data.cache_dir=none", "method.name=gkd",
            f"checkpoint.dir={tmp}/ckpt", f"logging.dir={tmp}/tb", *extra]


_kept: list = []   # per worker process: trainers holding vLLM replicas are never dropped (tests/test_vllm_rollouts.py)


def _guarded_runs(pair: str, tmp: str) -> dict:
    """Per engine, the guard's figures on 2 on-policy steps; then a run whose replica is never synced."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.generation.vllm_rollouts import VllmRollouts
    from megatron_tsdkd.engines.trainer import build_trainer

    out = {}
    for engine in ("megatron", "vllm"):
        trainer = build_trainer(load_config(CONFIG, _overrides(pair, f"{tmp}/{engine}", f"rollout.engine={engine}")))
        _kept.append(trainer)
        out[engine] = [trainer.train_step().metrics for _ in range(2)]
    original = VllmRollouts.sync
    VllmRollouts.sync = lambda self: 0.0   # every sync skipped: the replica keeps vLLM's start-up weights
    try:
        trainer = build_trainer(load_config(CONFIG, _overrides(
            pair, f"{tmp}/stale", "rollout.engine=vllm", "rollout.logprob_diff_patience=2")))
        _kept.append(trainer)
        stale = []
        try:
            for _ in range(3):
                stale.append(trainer.train_step().metrics)
            out["stale"] = ("no stop", stale)
        except RolloutDriftError as error:
            out["stale"] = (str(error), stale)
    finally:
        VllmRollouts.sync = original
    return out


def test_guard_in_training_ours_zero_vllm_small_stale_replica_stops(tied_pair, tmp_path):
    results = run_parallel(_guarded_runs, tied_pair, str(tmp_path), world_size=2, tp=2)
    rank0 = results[0]
    for engine, bound in (("megatron", 1e-4), ("vllm", 1e-3)):
        for metrics in rank0[engine]:
            assert metrics["rollout/on_policy"] == 1.0
            assert 0.0 <= metrics[DIFF] < bound, (engine, metrics[DIFF])
            assert 0.0 <= metrics[KL] < bound, (engine, metrics[KL])
    message, steps = rank0["stale"]
    assert len(steps) == 1 and steps[0][DIFF] > 1.0, [(s[DIFF], s[KL]) for s in steps]   # step 1 logged, step 2 stopped
    assert message.startswith("rollout.engine=vllm: the rollouts' log-probabilities"), message
    assert "2 on-policy steps in a row (up to step 2)" in message
    assert results[1]["stale"][0] == message   # every rank stops together, with the same line
