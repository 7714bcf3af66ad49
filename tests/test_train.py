"""The main job, proven against its serial twin: TP=2 x PP=2 reproduces TP=1 x PP=1 step by step; resume is exact;
a SIGTERM leaves a loadable checkpoint; a truncated checkpoint is refused; bad setups stop before any work."""
import json
import math
import os
import signal

import pytest
import torch

from harness import run_parallel, run_serial

STEPS = 3
DEMO_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "megatron_tsdkd", "assets", "demo", "teacher")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny teacher (Qwen2) and student (Llama) that share the demo tokenizer, and a small JSONL data set."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from megatron_tsdkd.data.arithmetic_chains import make_problems

    root = tmp_path_factory.mktemp("train")
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    vocab = len(tok) + 3  # rows beyond the tokenizer: must never be trained towards or sampled
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=256, tie_word_embeddings=False,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    student = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=256, tie_word_embeddings=False,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    with open(root / "train.jsonl", "w") as f:
        for p in make_problems(seed=7, count=64):
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution, "answer": p.answer}) + "\n")
    return root


def overrides(root, method="tsdkd", on_policy=False, extra=()):
    return [
        f"models.student.path={root}/student", f"models.teacher.path={root}/teacher", f"data.train={root}/train.jsonl",
        f"method.name={method}", "data.max_length=64", "data.max_prompt_length=32", "precision.dtype=fp32",
        "batch.global_size=4", "batch.micro_size=2", f"schedule.max_steps={STEPS + 2}", "optimizer.lr=1e-3",
        "optimizer.clip_grad=1.0", f"rollout.on_policy_prob={1.0 if on_policy else 0.0}", "rollout.greedy=true",
        "rollout.max_new_tokens=12", "method.chunk_size=16", "logging.progress_bar=false",
        f"logging.dir={root}/tb", "checkpoint.interval=0", "checkpoint.resume=none", *extra,
    ]


def _train(argv, stop_after=None):
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.training.trainer import Trainer

    cfg = load_config(None, argv)
    trainer = Trainer(cfg)
    history = trainer.train(stop_after=stop_after)
    return [h.metrics for h in history if h.metrics is not None]


def _losses(metrics):
    return [m["loss/total"] for m in metrics]


@pytest.mark.parametrize("method, on_policy", [("tsdkd", False), ("tsdkd", True), ("gkd", False), ("gkd", True)])
def test_tp2_pp2_reproduces_serial(workdir, method, on_policy, tmp_path):
    argv = overrides(workdir, method, on_policy, [f"checkpoint.dir={tmp_path}/ck", f"schedule.max_steps={STEPS}"])
    serial = run_serial(_train, argv + ["parallel.tensor=1", "parallel.pipeline=1"])
    parallel = run_parallel(_train, argv + ["parallel.tensor=2", "parallel.pipeline=2",
                                            f"checkpoint.dir={tmp_path}/ck2"], world_size=4, tp=2, pp=2)[0]
    assert len(serial) == len(parallel) == STEPS
    for s, p in zip(serial, parallel):
        assert abs(s["loss/total"] - p["loss/total"]) <= 1e-4 * max(1.0, abs(s["loss/total"])), (s, p)
        assert s["rollout/on_policy"] == p["rollout/on_policy"] == float(on_policy)
        assert abs(s["optim/grad_norm"] - p["optim/grad_norm"]) <= 1e-4 * max(1.0, s["optim/grad_norm"])
    # the model learns something: the loss moves
    assert serial[0]["loss/total"] != serial[-1]["loss/total"]
    if method == "tsdkd":
        assert {"loss/direct", "loss/entropy", "loss/indirect", "loss/gate_mean"} <= set(serial[0])


def _every_method_trains(argv):
    """One process group, several short runs: each method's loss is finite and the student's weights move."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.training.colocation import unwrap
    from megatron_tsdkd.training.trainer import Trainer

    out = {}
    for method, extra in [("sft", []), ("kd", []), ("distillm", ["method.distillm_divergence=skew_rkl"]),
                          ("tsdkd", ["precision.dtype=bf16", "method.reference_compat=true"])]:
        trainer = Trainer(load_config(None, argv + [f"method.name={method}", *extra]))
        before = [p.detach().float().clone() for p in unwrap(trainer.student).parameters()]
        history = trainer.train()
        moved = max((p.detach().float() - b).abs().max().item()
                    for p, b in zip(unwrap(trainer.student).parameters(), before))
        out[method] = ([h.metrics["loss/total"] for h in history if h.metrics], moved,
                       {str(p.dtype) for p in unwrap(trainer.student).parameters()})
    return out


def test_every_method_and_bf16_train_at_tp2(workdir, tmp_path):
    argv = overrides(workdir, "sft", False, [f"checkpoint.dir={tmp_path}/ck", "schedule.max_steps=2",
                                             "parallel.tensor=2", "checkpoint.resume=none"])
    results = run_parallel(_every_method_trains, argv, world_size=2, tp=2)[0]
    for method, (losses, moved, dtypes) in results.items():
        assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), (method, losses)
        assert moved > 0, method
    assert "torch.bfloat16" in results["tsdkd"][2]  # bf16 weights (fp32 master copies live in the optimizer)


def test_resume_after_kill_matches_uninterrupted_run(workdir, tmp_path):
    total = STEPS + 2
    base = overrides(workdir, "tsdkd", True, ["checkpoint.interval=2", "parallel.tensor=2"])
    full = run_parallel(_train, base + [f"checkpoint.dir={tmp_path}/full"], world_size=2, tp=2)[0]
    # "killed" after step 3: the last checkpoint on disk is step 2, step 3's work is lost
    first = run_parallel(_train, base + [f"checkpoint.dir={tmp_path}/cut"], world_size=2, tp=2, stop_after=3)[0]
    assert len(first) == 3
    assert open(tmp_path / "cut" / "latest").read().strip() == "step_000002"
    resumed = run_parallel(_train, base + [f"checkpoint.dir={tmp_path}/cut", "checkpoint.resume=auto"],
                           world_size=2, tp=2)[0]
    assert len(full) == total and len(resumed) == total - 2
    for a, b in zip(_losses(full)[2:], _losses(resumed)):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), (_losses(full), _losses(resumed))


def _train_with_sigterm(argv, after_step):
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.training.trainer import Trainer

    trainer = Trainer(load_config(None, argv))
    real_step = trainer.train_step

    def step_then_signal():
        result = real_step()
        if result.step == after_step:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends at preemption
        return result

    trainer.train_step = step_then_signal
    return len(trainer.train())


def _load_latest(argv):
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.training.trainer import Trainer

    trainer = Trainer(load_config(None, argv))
    assert trainer.maybe_resume()
    return trainer.step


def test_sigterm_saves_loadable_checkpoint_and_truncation_is_refused(workdir, tmp_path):
    argv = overrides(workdir, "gkd", False, [f"checkpoint.dir={tmp_path}/ck", "parallel.tensor=2",
                                             "schedule.max_steps=50"])
    ran = run_parallel(_train_with_sigterm, argv, 2, world_size=2, tp=2)
    assert ran == [2, 2]  # stopped right after the signalled step, far before 50
    assert open(tmp_path / "ck" / "latest").read().strip() == "step_000002"
    steps = run_parallel(_load_latest, argv + ["checkpoint.resume=auto"], world_size=2, tp=2)
    assert steps == [2, 2]

    folder = tmp_path / "ck" / "step_000002"
    victim = max((p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(AssertionError, match="truncated or altered"):
        run_parallel(_load_latest, argv + ["checkpoint.resume=auto"], world_size=2, tp=2)


def test_bad_setups_stop_before_any_work(workdir, tmp_path):
    from transformers import AutoTokenizer

    from megatron_tsdkd.config import ConfigError, load_config
    from megatron_tsdkd.training.setup import PreflightError, prepare

    with pytest.raises(ConfigError, match="method.top_k: expected an integer"):
        load_config(None, overrides(workdir, extra=["method.top_k=1.5"]))
    # TP must divide the heads: the student has 4 heads, 2 query groups
    with pytest.raises(PreflightError, match="models.student"):
        prepare(load_config(None, overrides(workdir, extra=["parallel.tensor=8"])))
    # a teacher whose tokenizer differs from the student's
    other = tmp_path / "teacher_other_tok"
    os.system(f"cp -r {workdir}/teacher {other}")
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    with pytest.raises(PreflightError, match="teacher's tokenizer differs from the student's"):
        prepare(load_config(None, overrides(workdir, extra=[f"models.teacher.path={other}"])))
    # a malformed data line names file:line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "response": "2"}\n{"prompt": 3\n')
    with pytest.raises(PreflightError, match=r"bad\.jsonl:2"):
        prepare(load_config(None, overrides(workdir, extra=[f"data.train={bad}"])))
