"""Mixture-of-experts models (Qwen3-MoE) on megatron-core's MoE layers: transformers' logits at every layout,
expert parallelism included, and the HF <-> megatron round trip.

The tiny model has 8 experts, top-2 renormalised (Qwen3-30B-A3B's router), random weights everywhere and a router
scaled so that no token's top-2 choice is a near-tie a rounding difference could flip.
"""
from __future__ import annotations

import os

import pytest
import torch
from harness import run_parallel, run_serial
from test_models import BATCH, SEQ, TOLERANCE, _forward_logits
from tiny_models import VOCAB_SIZE, make_tiny_hf_model, write_problems

from megatron_tsdkd.models import padded_vocab_size


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return make_tiny_hf_model("qwen3_moe", str(tmp_path_factory.mktemp("tiny_moe") / "qwen3_moe"), seed=5)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_logits(moe_dir, input_ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(moe_dir).eval()(input_ids).logits


# ---------------------------------------------------------------------------------------------------------------
# On the ranks

def _moe_logits(path: str, input_ids: torch.Tensor):
    from megatron_tsdkd.models import build_model, load_hf_weights, read_hf_config

    model = build_model(read_hf_config(path))
    load_hf_weights(model, path)
    model.eval()
    return _forward_logits(model, input_ids)


def _check(results: list, hf_logits: torch.Tensor, tp: int, pp: int) -> float:
    """One rank per data-parallel replica returns logits (every replica runs the same batch: under expert
    parallelism each replica's tokens visit the other's experts)."""
    got = [r for r in results if r is not None]
    assert len(got) == len(results) // (tp * pp), f"{len(got)} ranks returned logits"
    assert all(logits.shape == (BATCH, SEQ, padded_vocab_size(VOCAB_SIZE, tp)) for logits in got)
    diff = max((logits[..., :VOCAB_SIZE] - hf_logits).abs().max().item() for logits in got)
    print(f"max |megatron - transformers| logits: {diff:.2e}")
    assert diff <= TOLERANCE, diff
    return diff


@pytest.mark.parametrize("world, tp, pp, ep", [(1, 1, 1, 1), (2, 1, 1, 2), (2, 2, 1, 1), (2, 1, 2, 1), (4, 2, 1, 2)],
                         ids=["serial", "ep2", "tp2", "pp2", "tp2xep2"])
def test_moe_logits_match_transformers(moe_dir, input_ids, hf_logits, world, tp, pp, ep):
    _check(run_parallel(_moe_logits, moe_dir, input_ids, world_size=world, tp=tp, pp=pp, ep=ep), hf_logits, tp,
           pp)


def _to_mcore(hf_dir: str, out: str, tp: int, pp: int, ep: int) -> None:
    from megatron_tsdkd.models.convert import hf_to_mcore_rank

    hf_to_mcore_rank(hf_dir, out, tp, pp, torch.float32, ep=ep)


def _to_hf(mcore_dir: str, out: str, tp: int, pp: int, ep: int) -> None:
    from megatron_tsdkd.models.convert import mcore_to_hf_rank

    mcore_to_hf_rank(mcore_dir, out, tp, pp, None, ep=ep)


def test_moe_round_trip_reshards_experts_bit_exactly(moe_dir, tmp_path):
    """HF -> megatron checkpoint with the experts split over 2 ranks -> HF from TP=2 x EP=2 and from one rank:
    every tensor (router, each expert) bit-exact, the experts' files written by their own ranks."""
    from test_convert import assert_same_hf_folder

    ckpt = str(tmp_path / "mcore_ep2")
    run_parallel(_to_mcore, moe_dir, ckpt, 1, 1, 2, world_size=2, ep=2)
    run_parallel(_to_hf, ckpt, str(tmp_path / "hf_tp2_ep2"), 2, 1, 2, world_size=4, tp=2, ep=2)
    run_serial(_to_hf, ckpt, str(tmp_path / "hf_serial"), 1, 1, 1)
    for exported in ("hf_tp2_ep2", "hf_serial"):
        assert_same_hf_folder(moe_dir, str(tmp_path / exported))


# ---------------------------------------------------------------------------------------------------------------
# Training: a MoE teacher on its own expert-parallel layout, a MoE student at EP=2

DEMO_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "megatron_tsdkd", "assets", "demo", "teacher")
STEPS = 2
STEP_TOLERANCE = 1e-6   # relative, fp32


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    """A tiny Qwen3-MoE teacher (8 experts, top-2) and a dense Llama student, a tiny Qwen3-MoE student (4 experts,
    top-2) and a dense Qwen2 teacher, all on the demo tokenizer, and a small JSONL data set."""
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    root = tmp_path_factory.mktemp("moe_pair")
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    ids = dict(vocab_size=len(tok) + 3, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               max_position_embeddings=256, tie_word_embeddings=False)
    moe = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts_per_tok=2,
               norm_topk_prob=True, **ids)
    torch.manual_seed(0)
    models = {
        "moe_teacher": Qwen3MoeForCausalLM(Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_experts=8,
                                                          moe_intermediate_size=32, **moe)),
        "moe_student": Qwen3MoeForCausalLM(Qwen3MoeConfig(hidden_size=32, num_hidden_layers=2, num_experts=4,
                                                          moe_intermediate_size=32, router_aux_loss_coef=0.01,
                                                          **moe)),
        "student": LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, **ids)),
        "teacher": Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=8, num_key_value_heads=4, **ids)),
    }
    for name, model in models.items():
        with torch.no_grad():   # routers with clear top-2 choices (no near-ties a reduction order could flip)
            for pname, param in model.named_parameters():
                if pname.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.5)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_problems(root / "train.jsonl", count=64)
    return root


def _overrides(root, student, teacher, *extra):
    return [f"models.student.path={root}/{student}", f"models.teacher.path={root}/{teacher}",
            f"data.train={root}/train.jsonl", "method.name=tsdkd", "data.max_length=64", "data.max_prompt_length=32",
            "precision.dtype=fp32", "batch.global_size=8", "batch.micro_size=2", f"schedule.max_steps={STEPS}",
            "optimizer.lr=1e-3", "optimizer.clip_grad=1.0", "rollout.on_policy_prob=1.0", "rollout.greedy=true",
            "rollout.max_new_tokens=12", "method.chunk_size=16", "logging.progress_bar=false",
            f"logging.dir={root}/tb", "checkpoint.interval=0", "checkpoint.resume=none", *extra]


def _train_runs(argvs):
    """Per run: whether the teacher ran on its own groups, and (loss, grad norm, router aux loss) per step."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    out = []
    for argv in argvs:
        trainer = build_trainer(load_config(None, argv))
        history = [h.metrics for h in trainer.train() if h.metrics is not None]
        out.append((trainer.engine.own_teacher is not None,
                    [(m["loss/total"], m["optim/grad_norm"], m.get("loss/router_aux")) for m in history]))
    return out


def _same(a, b):
    return abs(a - b) <= STEP_TOLERANCE * max(1.0, abs(a))


def test_moe_teacher_at_ep2_and_moe_student_at_ep2_reproduce_their_references(pair_dir, tmp_path):
    """A TSD-KD step with a MoE teacher whose experts are split over 2 ranks (its own layout) beside a dense student
    at DP=2 equals the single-process run (loss and gradient norm per step); a MoE student trained at EP=2 equals
    the same student at EP=1 (both DP=2), its load-balancing loss included."""
    moe_teacher = _overrides(pair_dir, "student", "moe_teacher", f"checkpoint.dir={tmp_path}/a")
    moe_student = _overrides(pair_dir, "moe_student", "teacher", f"checkpoint.dir={tmp_path}/b")
    [(own_serial, serial)] = run_serial(_train_runs, [moe_teacher])
    (own_ep2, teacher_ep2), (_, student_ep1), (_, student_ep2) = run_parallel(
        _train_runs, [moe_teacher + ["parallel.teacher.expert=2"], moe_student,
                      moe_student + ["parallel.expert=2"]], world_size=2)[0]
    assert not own_serial and own_ep2   # EP=2 puts the teacher on groups of its own
    for one, many in ((serial, teacher_ep2), (student_ep1, student_ep2)):
        assert len(one) == len(many) == STEPS
        for (loss_1, norm_1, _), (loss_n, norm_n, _) in zip(one, many):
            assert _same(loss_1, loss_n) and _same(norm_1, norm_n), (one, many)
    assert all(aux is None for *_, aux in serial)   # a dense student has no router
    for (*_, aux_1), (*_, aux_2) in zip(student_ep1, student_ep2):
        assert aux_1 > 0 and _same(aux_1, aux_2), (student_ep1, student_ep2)


def _decode_until_this_ranks_eos(path: str) -> list[int]:
    """Rank 0 calls every token an EOS (its rows stop at once), rank 1 none (its rows run to the end): the EP
    replicas must still step together, or rank 1's all-to-all waits forever for rank 0."""
    import torch.distributed as dist

    from megatron_tsdkd.generation import SamplingConfig, generate
    from megatron_tsdkd.models import build_model, load_hf_weights, read_hf_config

    model = build_model(read_hf_config(path))
    load_hf_weights(model, path)
    model.eval()
    eos = range(VOCAB_SIZE) if dist.get_rank() == 0 else ()
    config = SamplingConfig(greedy=True, max_new_tokens=6, stop_check_interval=1)
    out = generate(model, [[5, 17, 33], [7, 8, 9, 10]], config, eos_token_ids=eos, pad_token_id=0,
                   vocab_size=VOCAB_SIZE)
    return [len(r) for r in out.responses]


def test_expert_parallel_replicas_decode_in_step_until_all_stop(moe_dir):
    assert run_parallel(_decode_until_this_ranks_eos, moe_dir, world_size=2, ep=2, timeout=120) == [[1, 1], [6, 6]]


def test_moe_layouts_a_run_cannot_take_stop_before_start_in_one_line(pair_dir, tmp_path, monkeypatch):
    from test_preflight import _preflight_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    student = _overrides(pair_dir, "moe_student", "teacher", f"checkpoint.dir={tmp_path}/c")
    teacher = _overrides(pair_dir, "student", "moe_teacher", f"checkpoint.dir={tmp_path}/c")
    assert _preflight_error(student + ["parallel.tensor=2"]).startswith(
        "parallel: qwen3_moe model: a trained mixture-of-experts model runs at tensor parallel 1 only")
    assert _preflight_error(teacher + ["parallel.teacher.expert=4"]).startswith(
        "parallel.teacher.expert: 4 must divide the teacher's 2 data-parallel replicas")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert _preflight_error(teacher + ["parallel.teacher.expert=3"]) == (
        f"parallel.teacher: qwen3_moe model: 8 experts are not divisible by expert parallel 3 "
        f"(models.teacher.path={pair_dir}/moe_teacher)")
    assert _preflight_error(teacher + ["parallel.expert=3"]) == (
        f"parallel: llama model: expert parallel 3 needs a mixture-of-experts model; this one is dense "
        f"(models.student.path={pair_dir}/student)")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _preflight_error(teacher + ["engine=deepspeed", "parallel.teacher.colocated=true"]) == (
        "models.teacher.path: mixture-of-experts models run on engine=megatron (megatron-core's MoE layers, expert "
        "parallelism); engine=deepspeed trains dense models only")


def _losses(argv, stop_after=None):
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    trainer = build_trainer(load_config(None, argv))
    return [h.metrics["loss/total"] for h in trainer.train(stop_after=stop_after) if h.metrics is not None]


def test_moe_student_resumes_exactly_and_its_checkpoint_reshards_over_experts(pair_dir, tmp_path):
    """A MoE student trained with its experts over 2 ranks, "killed" after step 3 (its last checkpoint: step 2),
    resumes to log the uninterrupted run's losses; the checkpoint's weights export from 2 expert-parallel ranks and
    from one alike, to the bit (training state resumes at the layout it was saved at: megatron-core's dp_reshardable
    optimizer format, as for TP/PP; the weights load at any)."""
    from test_convert import read_hf_tensors

    base = _overrides(pair_dir, "moe_student", "teacher", "schedule.max_steps=4", "checkpoint.interval=2",
                      "checkpoint.async_save=false", "parallel.expert=2")
    full = run_parallel(_losses, base + [f"checkpoint.dir={tmp_path}/full"], world_size=2, ep=2)[0]
    cut = base + [f"checkpoint.dir={tmp_path}/cut"]
    assert len(run_parallel(_losses, cut, world_size=2, ep=2, stop_after=3)[0]) == 3
    assert open(tmp_path / "cut" / "latest").read().strip() == "step_000002"
    resumed = run_parallel(_losses, cut + ["checkpoint.resume=auto"], world_size=2, ep=2)[0]
    assert len(full) == 4 and len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        assert _same(a, b), (full, resumed)
    run_parallel(_to_hf, str(tmp_path / "cut"), str(tmp_path / "hf_ep2"), 1, 1, 2, world_size=2, ep=2)
    run_serial(_to_hf, str(tmp_path / "cut"), str(tmp_path / "hf_one"), 1, 1, 1)
    two, one = read_hf_tensors(str(tmp_path / "hf_ep2")), read_hf_tensors(str(tmp_path / "hf_one"))
    assert sorted(two) == sorted(one) and any(".mlp.experts.3." in name for name in one)
    assert all(torch.equal(two[name], one[name]) for name in one)
