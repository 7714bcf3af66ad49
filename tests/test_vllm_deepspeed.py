"""engine=deepspeed with rollouts on a colocated vLLM replica (engines/deepspeed/engine.py, rollout.engine=vllm).

On 2 gloo ranks under ZeRO-3, a tiny random Qwen2 student with head_dim 64 (vLLM's CPU attention has no head_dim
16): the replica, fed by ``DeepSpeedEngine.student_hf_tensors`` (one module's gather at a time), gives the same
greedy responses as transformers' ``generate`` on the gathered weights; after a real on-policy train step with a
large learning rate (whose rollout the replica drew) the step itself marks the weights stale and the next sync
follows the new weights; a resumed checkpoint marks them stale again. The real vocabulary (259 of the config's 300
rows) is enforced on both sides: the random rows beyond it would otherwise win often.

The trainer is built with rollout.engine=megatron (no replica) and the test attaches one from a per-worker cache:
vLLM's shutdown destroys the process group the worker pool shares, so a worker builds it once and never closes it.
"""
from __future__ import annotations

import json

import pytest
import torch
from harness import run_parallel
from tiny_models import make_tiny_hf_model

PROMPTS = [[5, 17, 33, 9, 100, 250, 31], [7, 8], [42, 43, 44, 45, 46]]
REAL_VOCAB = 259            # the tiny tokenizer's size; the config has 300 rows
EOS, PAD = 2, 0
MAX_NEW = 12
HEAD_DIM_64 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192)

_replicas: dict = {}   # per worker process: hf dir -> VllmReplica (see the module docstring)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """Student (head_dim 64) and a smaller teacher with the same tokenizer, and a few short chat examples."""
    root = tmp_path_factory.mktemp("vllm_ds")
    make_tiny_hf_model("qwen2", str(root / "student"), seed=31, **HEAD_DIM_64)
    make_tiny_hf_model("qwen2", str(root / "teacher"), seed=32)
    with open(root / "train.jsonl", "w") as f:
        for a in range(8):
            f.write(json.dumps({"prompt": f"{a}+{a + 3}=", "response": str(2 * a + 3)}) + "\n")
    return str(root)


def _argv(root: str) -> list[str]:
    return [
        f"models.student.path={root}/student", f"models.teacher.path={root}/teacher", f"data.train={root}/train.jsonl",
        "engine=deepspeed", "deepspeed.zero_stage=3", "deepspeed.teacher_zero3_inference=false",
        "method.name=gkd", "rollout.engine=megatron", "rollout.on_policy_prob=1.0", "rollout.greedy=true",
        f"rollout.max_new_tokens={MAX_NEW}", "data.max_length=64", "data.max_prompt_length=32",
        "precision.dtype=fp32", "batch.global_size=4", "batch.micro_size=2", "schedule.max_steps=4",
        "schedule.warmup_fraction=0", "schedule.decay=constant", "optimizer.lr=0.1", "method.chunk_size=16",
        "logging.progress_bar=false", "logging.interval=1", f"logging.dir={root}/tb", "checkpoint.interval=0",
        "checkpoint.resume=none",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Code that runs on the ranks.

def _replica(path: str):
    from megatron_tsdkd.generation.vllm_replica import VllmReplica

    if path not in _replicas:
        _replicas[path] = VllmReplica(path, dtype=torch.float32, vocab_size=REAL_VOCAB, max_model_len=64,
                                      max_rows=16, memory_fraction=0.3)
    return _replicas[path]


def _hf_greedy(trainer, path: str):
    """Collective: transformers' greedy responses to PROMPTS from the student's gathered weights (rank 0; None
    elsewhere), and the gathered state dict's names."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    state = trainer.engine.gathered_state_dict()
    if state is None:
        return None, None

    class RealVocabulary(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, REAL_VOCAB:] = -float("inf")
            return scores

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=True)
    responses = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                 do_sample=False, eos_token_id=[EOS], pad_token_id=PAD,
                                 logits_processor=LogitsProcessorList([RealVocabulary()]))
            responses.append(out[0, len(prompt):].tolist())
    return responses, sorted(state)


def _vllm_deepspeed(root: str, ck: str) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.generation import SamplingConfig
    from megatron_tsdkd.generation.vllm_rollouts import VllmRollouts
    from megatron_tsdkd.engines.trainer import build_trainer

    student = f"{root}/student"
    trainer = build_trainer(load_config(None, _argv(root) + [f"checkpoint.dir={ck}"]))
    out = {"built_without_replica": not isinstance(trainer.rollouts, VllmRollouts)}
    rollouts = VllmRollouts(_replica(student), trainer.engine.student_hf_tensors, (EOS,),
                            group=ps.get_model_parallel_group())
    trainer.rollouts = rollouts
    calls = []
    real_generate = rollouts.generate

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return real_generate(*args, **kwargs)

    rollouts.generate = counted
    greedy = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW)

    def vllm():
        result, seconds = real_generate(PROMPTS, greedy, generator_seed=0)
        return result.responses, seconds

    out["streamed_names"] = sorted(name for name, _ in trainer.engine.student_hf_tensors())
    out["vllm_before"], out["sync_before"] = vllm()
    out["hf_before"], out["state_names"] = _hf_greedy(trainer, student)
    step = trainer.train_step()   # on-policy: its rollout is the replica's (synced: no sync in the step)
    out["rollout_calls"], out["metrics"] = list(calls), step.metrics
    out["stale_after_step"] = rollouts.stale
    out["vllm_after"], out["sync_after"] = vllm()
    out["hf_after"], _ = _hf_greedy(trainer, student)
    # a resume loads older weights into the student: the replica must follow them too
    folder = trainer.save_checkpoint()
    trainer.train_step()
    out["vllm_step2"], _ = vllm()
    out["resumed"] = trainer.maybe_resume(folder)
    out["stale_after_resume"] = rollouts.stale
    out["vllm_resumed"], _ = vllm()
    return out


# ---------------------------------------------------------------------------------------------------------------

def test_zero3_student_streams_into_vllm_and_follows_steps_and_resume(workdir, tmp_path):
    results = run_parallel(_vllm_deepspeed, workdir, str(tmp_path / "ck"), world_size=2)
    hf_before, hf_after, names = results[0]["hf_before"], results[0]["hf_after"], results[0]["state_names"]
    assert hf_after != hf_before, "the large-lr step must change the greedy responses"
    for rank, r in enumerate(results):
        assert r["built_without_replica"]
        assert r["streamed_names"] == names, f"rank {rank}: streamed names differ from the HF state dict's"
        assert r["vllm_before"] == hf_before, f"rank {rank}: vLLM {r['vllm_before']} != HF {hf_before}"
        assert r["sync_before"] > 0
        assert r["rollout_calls"] == [2], f"rank {rank}: the step's rollout must be the replica's {r['rollout_calls']}"
        assert r["stale_after_step"], "the optimizer step must mark the replica's weights stale"
        assert r["vllm_after"] == hf_after, f"rank {rank} after the step: vLLM {r['vllm_after']} != HF {hf_after}"
        assert r["sync_after"] > 0
        assert r["vllm_step2"] != r["vllm_after"], "step 2 must change the responses, else the resume proves nothing"
        assert r["resumed"] and r["stale_after_resume"]
        assert r["vllm_resumed"] == r["vllm_after"], f"rank {rank}: after resume the replica must hold step 1's weights"
        assert all(t < REAL_VOCAB for row in r["vllm_before"] + r["vllm_after"] for t in row)
    metrics = results[0]["metrics"]
    assert metrics["rollout/on_policy"] == 1.0 and metrics["rollout/response_length"] > 0
    assert metrics["time/weight_sync"] == 0.0   # the replica was synced just before this step
