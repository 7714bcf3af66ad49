"""A teacher with its own layout (parallel.teacher.*), proven against the single-process run: loss and gradient
norm per step within 1e-6 (fp32) for three teacher | student layouts on 4 gloo processes, on-policy TSD-KD and
GKD (and off-policy KD); the handoff's bytes counted against sending the logits; the symmetric layout on the
teacher's own groups equal to the co-located run. (A resumed run with the teacher on its own layout:
tests/test_train.py test_resume_after_kill_matches_uninterrupted_run.)"""
import os

import pytest
import torch

from harness import run_parallel, run_serial
from tiny_models import write_problems

STEPS = 2
DEMO_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "megatron_tsdkd", "assets", "demo", "teacher")
TOLERANCE = 1e-6   # relative, fp32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny teachers (Qwen2, GQA 8 heads / 4 KV heads, head_dim 8; one with tied embeddings, one without), a Llama
    student (4 heads / 2 KV heads) sharing the demo tokenizer, and a small JSONL data set."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("teacher_layout")
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    vocab = len(tok) + 3
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    for name, tie in (("teacher", False), ("teacher_tied", True)):
        Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                     tie_word_embeddings=tie, **ids)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False, **ids)).save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    write_problems(root / "train.jsonl", count=64)
    return root


def overrides(root, teacher, method, extra=()):
    return [
        f"models.student.path={root}/student", f"models.teacher.path={root}/{teacher}", f"data.train={root}/train.jsonl",
        f"method.name={method}", "data.max_length=64", "data.max_prompt_length=32", "precision.dtype=fp32",
        "batch.global_size=8", "batch.micro_size=2", f"schedule.max_steps={STEPS}", "optimizer.lr=1e-3",
        "optimizer.clip_grad=1.0", "rollout.on_policy_prob=1.0", "rollout.greedy=true", "rollout.max_new_tokens=12",
        "method.chunk_size=16", "logging.progress_bar=false", f"logging.dir={root}/tb", "checkpoint.interval=0",
        "checkpoint.resume=none", *extra]


def _train(argv, stop_after=None):
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    trainer = build_trainer(load_config(None, argv))
    history = trainer.train(stop_after=stop_after)
    own = trainer.engine.own_teacher is not None   # the teacher on its own process groups, not co-located
    return own, [(h.metrics["loss/total"], h.metrics["optim/grad_norm"]) for h in history if h.metrics is not None]


def _trains(argvs):
    return [_train(argv) for argv in argvs]


def _close(a, b):
    return abs(a - b) <= TOLERANCE * max(1.0, abs(a))


def _convert(hf_dir, out_dir):
    from megatron_tsdkd.models.convert import hf_to_mcore_rank

    hf_to_mcore_rank(hf_dir, out_dir, 1, 1, torch.float32)


# (teacher TP, teacher PP | student TP, student PP, the teacher model, the methods) on 4 processes; "teacher_mcore" is
# the untied teacher converted to a megatron-core checkpoint at TP=1 (resharded as it loads), its reference the HF
# folder; on-policy TSD-KD and GKD everywhere, and once supervised KD off-policy
LAYOUTS = [(4, 1, 2, 1, "teacher_tied", ("tsdkd", "gkd", "kd")),
           (2, 2, 1, 1, "teacher_mcore", ("tsdkd", "gkd")), (1, 2, 2, 1, "teacher_tied", ("tsdkd", "gkd"))]
METHOD_SETTINGS = {"kd": ["rollout.on_policy_prob=0"]}
SERIAL: dict = {}   # (teacher, method) -> the single-process run, shared by the layouts with the same teacher


@pytest.mark.parametrize("t_tp, t_pp, s_tp, s_pp, teacher, methods", LAYOUTS,
                         ids=[f"teacher_tp{a}pp{b}-student_tp{c}pp{d}" for a, b, c, d, *_ in LAYOUTS])
def test_own_teacher_layout_reproduces_the_single_process_run(workdir, tmp_path, t_tp, t_pp, s_tp, s_pp, teacher,
                                                              methods):
    reference = teacher.removesuffix("_mcore")
    argvs = [overrides(workdir, reference, m, [f"checkpoint.dir={tmp_path}/{m}", *METHOD_SETTINGS.get(m, [])])
             for m in methods]
    missing = [(m, argv) for m, argv in zip(methods, argvs) if (reference, m) not in SERIAL]
    for (m, _), run in zip(missing, run_serial(_trains, [argv for _, argv in missing]) if missing else []):
        SERIAL[reference, m] = run
    serial = [SERIAL[reference, m] for m in methods]
    layout = [f"parallel.tensor={s_tp}", f"parallel.pipeline={s_pp}", f"parallel.teacher.tensor={t_tp}",
              f"parallel.teacher.pipeline={t_pp}", f"models.teacher.path={workdir}/{teacher}"]
    if teacher != reference:
        run_serial(_convert, str(workdir / reference), str(workdir / teacher))
    parallel = run_parallel(_trains, [argv + layout for argv in argvs], world_size=4, tp=s_tp, pp=s_pp)[0]
    for method, (own_1, one), (own_n, many) in zip(methods, serial, parallel):
        assert not own_1 and own_n
        assert len(one) == len(many) == STEPS, method
        for step, ((loss_1, norm_1), (loss_n, norm_n)) in enumerate(zip(one, many), 1):
            assert _close(loss_1, loss_n), (method, step, one, many)
            assert _close(norm_1, norm_n), (method, step, one, many)


def _one_step(argv):
    """One step; what this rank sent in the handoff, and the tokens it received (0 when its hidden states were a
    local slice or it computes no loss), with the padded vocabulary and the teacher's hidden size."""
    import torch.distributed as dist

    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    trainer = build_trainer(load_config(None, argv))
    teacher = trainer.engine.own_teacher
    captured = {}
    real_run = teacher.run

    def run(batches):
        captured["tokens"] = sum(b.input_ids.numel() for b in batches)
        return real_run(batches)

    teacher.run = run
    trainer.train_step()
    remote = teacher.is_loss_rank and dist.get_rank() not in teacher.teacher_last
    return teacher.handoff_bytes, captured["tokens"] if remote else 0, teacher.vocab, teacher.hidden


def test_the_handoff_moves_hidden_states_not_logits_and_counts_its_bytes(workdir, tmp_path):
    """Teacher TP=2 x PP=2 | student TP=1 x DP=4: ranks 2 and 3 are teacher last-stage ranks (a local slice), ranks 0
    and 1 receive their replica's hidden states over p2p."""
    argv = overrides(workdir, "teacher", "tsdkd", ["parallel.teacher.tensor=2", "parallel.teacher.pipeline=2",
                                                   f"checkpoint.dir={tmp_path}"])
    ranks = run_parallel(_one_step, argv, world_size=4)
    sent = sum(r[0] for r in ranks)
    received_tokens = sum(r[1] for r in ranks)
    vocab, hidden = ranks[0][2], ranks[0][3]
    assert [r[1] > 0 for r in ranks] == [True, True, False, False]
    assert sent == received_tokens * hidden * 4   # fp32 hidden states, nothing else
    logits = received_tokens * vocab * 4          # the same rows as the student's (TP=1) vocab-sharded logits
    print(f"handoff: {sent} bytes of hidden states per step vs {logits} bytes of teacher logits: "
          f"{logits / sent:.1f}x fewer (V {vocab} / h_t {hidden})")
    assert logits / sent == pytest.approx(vocab / hidden)


def test_the_symmetric_layout_on_the_teachers_own_groups_gives_the_co_located_numbers(workdir, tmp_path):
    """Both at TP=2 x PP=2: parallel.teacher.colocated=false runs the new path (own groups, forward pass, handoff
    to the last stage) and must give the co-located run's numbers (on-policy TSD-KD)."""
    argvs = [overrides(workdir, "teacher", method, ["parallel.tensor=2", "parallel.pipeline=2",
                                                    f"checkpoint.dir={tmp_path}/{method}"])
             for method in ("tsdkd",)]
    runs = run_parallel(_trains, [argv + [f"parallel.teacher.colocated={c}"] for argv in argvs for c in (True, False)],
                        world_size=4, tp=2, pp=2)[0]
    for (own_a, colocated), (own_b, separate) in zip(runs[0::2], runs[1::2]):
        assert not own_a and own_b
        for (loss_a, norm_a), (loss_b, norm_b) in zip(colocated, separate):
            assert _close(loss_a, loss_b) and _close(norm_a, norm_b), (colocated, separate)
