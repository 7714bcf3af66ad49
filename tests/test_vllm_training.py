"""On-policy TSD-KD with ``rollout.engine=vllm`` through plain torchrun, as a user runs it (2 gloo processes, TP=2):
20 steps train (the loss falls, the weights reach the replicas: ``time/weight_sync`` is logged every step), and a run
killed with SIGKILL after its step-10 checkpoint resumes to log exactly the uninterrupted run's losses for the
steps after it. Bad settings stop before start with one line naming ``rollout.engine``.

The pair: a tiny Qwen2 teacher and student with head_dim 64 (vLLM's CPU attention has no head_dim 16) sharing the
demo tokenizer, whose vocabulary is 3 rows short of the models' (never sampled: the replica masks them). The killed
run's teacher is a tiny Qwen3-MoE (8 experts, top-2) with its experts split over both ranks (parallel.teacher.expert
=2, its own layout): the on-policy run with a mixture-of-experts teacher that learns and resumes exactly.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiny_models import write_problems
from test_preemption import ROOT, Run, assert_complete_latest, logged_losses, run_env, runs  # noqa: F401

from slurm_cluster import poll_until

DEMO_TOKENIZER = os.path.join(ROOT, "megatron_tsdkd", "assets", "demo", "teacher")
STEPS, INTERVAL, KILL_AT = 20, 10, 14


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    root = tmp_path_factory.mktemp("vllm_pair")
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    torch.manual_seed(0)
    for name, layers in (("teacher", 3), ("student", 2)):
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok) + 3, hidden_size=256, intermediate_size=256, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(tok) + 3, hidden_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).save_pretrained(root / "moe_teacher")
    tok.save_pretrained(root / "moe_teacher")
    write_problems(root / "train.jsonl", count=80)
    return root


CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")


def argv(pair, ckpt, tb, *extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
            "--max_restarts=0", "-m", "megatron_tsdkd.cli", "train", "--config", CONFIG,
            *overrides(pair, ckpt, tb, *extra)]


def overrides(pair, ckpt, tb, *extra) -> list[str]:
    return [f"models.student.path={pair}/student", f"models.teacher.path={pair}/teacher",
            f"data.train={pair}/train.jsonl", "data.eval=", "checkpoint.export_hf=", "data.max_length=72",
            "data.max_prompt_length=40", "rollout.max_new_tokens=24", "rollout.engine=vllm", "batch.global_size=8",
            "batch.micro_size=4", f"schedule.max_steps={STEPS}", f"checkpoint.interval={INTERVAL}",
            "checkpoint.resume=auto", "checkpoint.async_save=false", "optimizer.lr=3e-3", "logging.interval=1",
            "logging.progress_bar=false", "method.gamma_em=0", f"checkpoint.dir={ckpt}", f"logging.dir={tb}",
            *extra]


# the student at TP=1 x DP=2 (a vLLM replica per rank, each sampling its own prompts), the MoE teacher's experts over
# both ranks on its own process groups (engines/megatron/teacher_layout.py): vLLM rollouts on the student side of
# independent layouts
OWN_TEACHER_LAYOUT = ("parallel.tensor=1", "parallel.teacher.expert=2")


def test_vllm_run_trains_and_resumes_exactly_after_kill_9(pair, runs, tmp_path):  # noqa: F811
    """One run killed with SIGKILL at step KILL_AT (its last checkpoint: step INTERVAL) is the reference for the
    steps it logged after that checkpoint; the resumed run must log exactly those losses, then train to the end."""
    moe_teacher = (*OWN_TEACHER_LAYOUT, f"models.teacher.path={pair}/moe_teacher")
    cut = runs(argv(pair, tmp_path / "ckpt", tmp_path / "cut_tb", *moe_teacher), str(tmp_path / "cut"))

    def killable():
        tb = tmp_path / "cut_tb"
        return (tb.is_dir() and max(logged_losses(tb) or {0: 0}) >= KILL_AT) or cut._ended(f"step {KILL_AT}")

    poll_until(killable, 240, f"step {KILL_AT} of the run to kill")
    cut.kill()   # SIGKILL to torchrun's process group: no handler runs
    assert "rollouts on vLLM" in cut.output() and "teacher layout: TP=1 PP=1 DP=2 EP=2" in cut.output(), \
        cut.output()[-3000:]
    before = logged_losses(tmp_path / "cut_tb")
    assert_complete_latest(tmp_path / "ckpt", INTERVAL)
    resumed = runs(argv(pair, tmp_path / "ckpt", tmp_path / "resumed_tb", *moe_teacher),
                   str(tmp_path / "resumed"))
    assert resumed.wait(300) == 0, resumed.output()[-3000:]
    after = logged_losses(tmp_path / "resumed_tb")
    assert sorted(after) == list(range(INTERVAL + 1, STEPS + 1))
    replayed = [s for s in range(INTERVAL + 1, STEPS + 1) if s in before]
    assert len(replayed) >= KILL_AT - INTERVAL, (sorted(before), KILL_AT)
    for step in replayed:   # sampled by the replicas, synced after every step: equal to the last bit
        assert after[step] == before[step], (step, after[step], before[step])
    first = sum(before[s] for s in (1, 2, 3)) / 3
    last = sum(after[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < 0.9 * first, (before, after)
    assert "weight_sync" in resumed.output()   # the step line's phases


def _train_line(pair, tmp_path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_tsdkd.cli", "train", "--config", CONFIG,
                           *overrides(pair, tmp_path / "c", tmp_path / "t", *extra)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)


def test_bad_vllm_settings_stop_before_start_with_one_line(pair, tmp_path):
    # head_dim 16 (the demo student): vLLM's CPU attention cannot serve it; checked before anything starts
    done = subprocess.run([sys.executable, "-m", "megatron_tsdkd.cli", "train", "--config", CONFIG, "--dry-run",
                           *overrides(pair, tmp_path / "c", tmp_path / "t",
                                      f"models.student.path={ROOT}/megatron_tsdkd/assets/demo/student",
                                      f"models.teacher.path={ROOT}/megatron_tsdkd/assets/demo/teacher")],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: rollout.engine: vllm cannot sample the student {ROOT}/megatron_tsdkd/assets/demo/student: vLLM's "
        "attention backend here (CPUAttentionBackend) does not support the student's head size 16; set "
        "rollout.engine=megatron (or auto)"], done.stderr[-2000:]


def test_co_generation_methods_refuse_vllm_in_one_line(pair, tmp_path):
    from megatron_tsdkd.config import ConfigError, load_config

    for method in ("skd", "minillm"):
        with pytest.raises(ConfigError, match=rf"^overrides: rollout\.engine: method {method} picks each token"):
            load_config(None, [*overrides(pair, tmp_path / "c", tmp_path / "t"), f"method.name={method}"])


_replicas: dict = {}   # per worker process, never closed (see tests/test_vllm_rollouts.py)


def _step_then_compare(argv: list) -> dict:
    """A real megatron training step (distributed optimizer, overlapped parameter all-gather, large learning rate),
    then vLLM's greedy responses against our decode, before and after."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.generation import SamplingConfig, generate
    from megatron_tsdkd.generation.vllm_replica import VllmReplica
    from megatron_tsdkd.generation.vllm_rollouts import VllmRollouts
    from megatron_tsdkd.engines.megatron.engine import sync_student_params
    from megatron_tsdkd.engines.trainer import build_trainer

    trainer = build_trainer(load_config(CONFIG, argv))
    inputs, tokens = trainer.inputs, trainer.tokens
    if inputs.student.meta_dir not in _replicas:
        _replicas[inputs.student.meta_dir] = VllmReplica(
            inputs.student.meta_dir, dtype=torch.float32, vocab_size=tokens.vocab_size, max_model_len=96, max_rows=8,
            memory_fraction=0.3)
    rollouts = VllmRollouts(_replicas[inputs.student.meta_dir], lambda: trainer.engine.student_hf_tensors(256 << 20),
                            tokens.stop_ids, group=ps.get_model_parallel_group())
    prompts = [inputs.train[i].prompt_ids for i in range(4)]
    greedy = SamplingConfig(greedy=True, max_new_tokens=16)

    def both():
        sync_student_params(trainer.student)
        ours = generate(unwrap_model(trainer.student), prompts, greedy, eos_token_ids=tokens.stop_ids,
                        pad_token_id=tokens.pad_id, vocab_size=tokens.vocab_size).responses
        theirs, _ = rollouts.generate(prompts, greedy, generator_seed=0)
        return ours, theirs.responses

    before = both()
    trainer.train_step()
    rollouts.weights_changed()
    return {"before": before, "after": both()}


def test_vllm_follows_a_real_optimizer_step_at_tp2(pair, tmp_path):
    from harness import run_parallel

    argv = overrides(pair, tmp_path / "c", tmp_path / "t", "rollout.engine=megatron", "parallel.tensor=2",
                     "optimizer.lr=0.05", "schedule.warmup_fraction=0", "optimizer.clip_grad=0")
    for rank, r in enumerate(run_parallel(_step_then_compare, argv, world_size=2, tp=2)):
        (ours, theirs), (ours_after, theirs_after) = r["before"], r["after"]
        assert theirs == ours, (rank, theirs, ours)
        assert theirs_after == ours_after, (rank, theirs_after, ours_after)
        assert ours_after != ours, "the step must change the greedy responses"
