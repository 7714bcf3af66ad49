"""Tokens/s of one on-policy TSD-KD training step, with its phase breakdown, student MFU and peak memory, against a
plain Hugging Face step doing the same work the way the reference code does (HF ``generate`` + full-vocabulary dense
loss), and our step with PyTorch SDPA attention against megatron's local attention, in one run.

    .venv/bin/python benchmarks/step_throughput.py                                   # CPU, tiny shapes
    python benchmarks/step_throughput.py --shapes qwen2.5-1.5b/7b --dtype bf16       # one GPU, real shapes
    python benchmarks/step_throughput.py --student-config configs/hf/Qwen2.5-1.5B-Instruct \
        --teacher-config configs/hf/Qwen2.5-7B-Instruct --dtype bf16                 # any pair of HF configs
    .venv/bin/python benchmarks/step_throughput.py --student-hidden 256 --student-layers 4 \
        --teacher-hidden 512 --teacher-layers 6 --vocab 32768                        # hand-made tiny shapes
    .venv/bin/python benchmarks/step_throughput.py --shapes qwen2.5-1.5b/7b --layers 1 --batch 2 --new-tokens 8 \
        --steps 1 --dtype bf16                  # real widths, heads and vocabularies, one layer: ~6 min on 2 CPU cores
    .venv/bin/python benchmarks/step_throughput.py --engines megatron,deepspeed --attentions sdpa --no-hf
                                                # the two engines side by side (engine=deepspeed: HF models, ZeRO-3)
    python benchmarks/step_throughput.py --shapes qwen2.5-1.5b/7b --teacher-layers 28 --dtype bf16 --batch 32 \
        --new-tokens 128 --micro-sizes 1,auto --attentions sdpa --no-hf
                                # benchmarks/gpu_check.sh's (b): micro-batch 1 against the memory plan's auto size

Models: random weights, built with transformers from the HF configs (or the --student-*/--teacher-* shapes) and
saved as safetensors folders with a tokenizer of ``--tokenizer-vocab`` tokens: the demo's character tokenizer
(102 tokens) extended with filler entries (``Ġtok<n>``, never produced by encoding text, decoded as " tok<n>"),
built locally with the ``tokenizers`` library. With HF configs it defaults to Qwen2.5's 151,665 tokens, so the
real vocabulary of our losses and sampling is Qwen2.5's (rows 151,665..152,063 are embedding padding, never
sampled nor a target) and the HF-style step's dense loss and sampling run over its 151,936 logits: both sides at
152k. ``--models-dir DIR`` keeps the folders (and the prompts) there and reuses them when they exist;
``--prepare-only`` builds them and stops (benchmarks/gpu_check.sh trains on the same folders);
``--disk-estimate`` prints the disk space that gpu_check.sh's run needs at these shapes (and what one teacher layer
adds), and builds nothing. With HF configs, ``--student-layers`` / ``--teacher-layers`` keep that many of a model's
layers (``--layers``: both); ``--ckpt-student-layers K`` also writes student_ckpt/, the student with K layers.

Each measurement runs in its own process (so each has its own peak memory): ours with ``models.attention=sdpa``,
ours with ``models.attention=local`` (and, with ``--micro-sizes 1,auto``, one run per micro-batch size, ``auto``
being the memory plan's choice, batch.micro_size=auto), and the HF-style step. A run that fails or outlasts
``--child-timeout`` (or what is left of ``--time-limit``) is named after the summary of the runs that ended, and the
exit status is 1; so is a measured step whose loss is not finite. Both sides start from the same weights, prompts and
sampling settings. Every figure is a mean over ``--steps`` steps after one warm-up step, timed on the wall clock
with a device synchronisation around each step. Tokens are the real ones (prompt + generated, no padding); HF's
``generate`` is forced to ``--new-tokens`` tokens while ours stops a row at its end-of-turn token, so ours counts
fewer tokens for a batch of the same padded width.

Figures printed (one summary block at the end):
- tokens/s of each, and ours / HF-style;
- student forward/backward MFU: model FLOPs 6 * N * T + causal attention 6 * layers * heads * head_dim * sum(s^2),
  with N the student's matmul parameters (transformer layers + LM head over the padded vocabulary; the embedding
  lookup does no FLOPs) and T the real tokens, over the trainer's time/student_forward + time/student_backward
  (CUDA events; the backward phase also holds the loss) and the GPU's peak dense bf16 FLOP/s (table below by device
  name, or ``TSDKD_PEAK_FLOPS=989e12``); the same on padded tokens, and the teacher forward's MFU;
- peak GPU memory (torch.cuda.max_memory_allocated / reserved), and the memory planner's predicted peak for the
  same config (training.memory_plan.plan_memory on inputs_from_config) with measured / predicted;
- the trainer's per-phase times (time/*) for both attentions and the HF-style step's phases;
- per run, the measured steps' loss/total (finite or not), skipped updates and loss scale (``--dtype fp16``: dynamic
  loss scaling) and the rollout guard's rollout/logprob_diff;
- SDPA vs local, and micro-batch auto vs 1: tokens/s and student forward+backward time.
- with ``--engines megatron,deepspeed``: the same phases for ``engine=deepspeed`` (its own process, ZeRO
  ``--zero-stage``, transformers' ``generate`` for the rollout), its planner row (planning/zero_memory_plan.py), and
  megatron / deepspeed: tokens/s, student forward+backward time and rollout time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

DEMO_TOKENIZER = os.path.join(REPO, "megatron_tsdkd", "assets", "demo", "teacher")
SHAPES = {  # --shapes NAME: (student, teacher) HF config folders shipped in configs/hf
    "qwen2.5-1.5b/7b": ("configs/hf/Qwen2.5-1.5B-Instruct", "configs/hf/Qwen2.5-7B-Instruct"),
    "qwen2.5-7b/14b": ("configs/hf/Qwen2.5-7B-Instruct", "configs/hf/Qwen2.5-14B-Instruct"),
}
# Peak dense (no sparsity) bf16 tensor-core FLOP/s by device name; the first entry whose key is in
# torch.cuda.get_device_name() wins (so the more specific names come first). TSDKD_PEAK_FLOPS overrides.
PEAK_BF16_FLOPS = (
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12),
)
GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QWEN25_TOKENIZER_SIZE = 151_665   # len(AutoTokenizer.from_pretrained("Qwen/Qwen2.5-7B-Instruct")): 151,643 + 22 special


# ---------------------------------------------------------------------------------------------------------------
# Models and data


def make_tokenizer(size: int, folder: str):
    """A tokenizer of ``size`` tokens in ``folder`` (returned loaded): the demo's character-level byte BPE, its
    specials, chat template and encoding unchanged, its vocabulary extended by ``size - 102`` filler entries.
    Hand-made because the real Qwen2.5 tokenizer is a hub download; what the benchmark needs is its size."""
    import json as json_module
    import shutil

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    with open(os.path.join(DEMO_TOKENIZER, "tokenizer.json")) as f:
        spec = json_module.load(f)
    vocab = spec["model"]["vocab"]
    if size < len(vocab):
        raise SystemExit(f"error: --tokenizer-vocab {size} is below the demo tokenizer's {len(vocab)} tokens")
    vocab.update({f"Ġtok{n}": n for n in range(len(vocab), size)})   # Ġ: the byte-level space
    os.makedirs(folder, exist_ok=True)
    Tokenizer.from_str(json_module.dumps(spec)).save(os.path.join(folder, "tokenizer.json"))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(DEMO_TOKENIZER, name), folder)
    tok = AutoTokenizer.from_pretrained(folder)
    if len(tok) != size:
        raise SystemExit(f"error: the synthetic tokenizer has {len(tok)} tokens, not {size}")
    return tok


def tokenizer_size(args) -> int:
    """--tokenizer-vocab, or its default: Qwen2.5's size with HF configs, the demo's 102 tokens for tiny shapes."""
    if args.tokenizer_vocab:
        return args.tokenizer_vocab
    return QWEN25_TOKENIZER_SIZE if args.student_config else 0


def _with_layers(config, layers: int):
    """A copy of a transformers config with only its first ``layers`` layers (real widths and vocabulary)."""
    import copy

    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    if hasattr(config, "max_window_layers"):
        config.max_window_layers = min(config.max_window_layers, layers)
    return config


def _model_configs(args, tok=None):
    """(student, teacher) transformers configs: from HF config folders, or Qwen2 configs of the tiny shapes.
    ``tok`` None: the demo tokenizer's special ids (the synthetic tokenizers keep them)."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2Config

    tok = tok or AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    special = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    if args.student_config:
        out = []
        for path, keep in ((args.student_config, args.student_layers), (args.teacher_config, args.teacher_layers)):
            config = AutoConfig.from_pretrained(os.path.join(REPO, path) if not os.path.isabs(path) else path)
            for key, value in special.items():  # the demo tokenizer's ids; the vocabulary keeps its real size
                setattr(config, key, value)
            keep = keep if keep is not None else args.layers
            if keep:  # real widths and vocabulary, fewer layers (a quick check of the layout, or a time budget)
                config = _with_layers(config, keep)
            out.append(config)
        return tok, out
    out = []   # as in the Qwen2.5-1.5B / 7B pair: the student ties its embeddings, the teacher does not
    for hidden, layers, tie in ((args.student_hidden, args.student_layers, True),
                                (args.teacher_hidden, args.teacher_layers, False)):
        heads = max(hidden // 128, 2)
        out.append(Qwen2Config(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=tie, **special))
    return tok, out


def _all_configs(args, tok=None):
    """(tokenizer, {folder name: config}): student/ and teacher/, and with ``--ckpt-student-layers K`` student_ckpt/,
    the student's widths and vocabulary with K layers (gpu_check.sh's checkpoint/resume/export run: a checkpoint
    of the full student would not fit the GPU machine's disk twice)."""
    tok, (student, teacher) = _model_configs(args, tok)
    configs = {"student": student, "teacher": teacher}
    if args.ckpt_student_layers:
        configs["student_ckpt"] = _with_layers(student, args.ckpt_student_layers)
    return tok, configs


def make_models(args, root: str) -> None:
    """student/ and teacher/ (and student_ckpt/) HF folders with random weights (in ``--dtype``, built on the GPU
    when there is one), train.jsonl (prompts with worked responses) and eval.jsonl (with answers), unless they
    exist already."""
    from megatron_tsdkd.data.arithmetic_chains import make_problems

    os.makedirs(root, exist_ok=True)
    problems = make_problems(seed=5, count=max(args.batch * (args.steps + 2) * 2, 64) + args.eval_count)
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for p in problems[args.eval_count:]:
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution}) + "\n")
    with open(os.path.join(root, "eval.jsonl"), "w") as f:
        for p in problems[:args.eval_count]:
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution, "answer": str(p.answer)}) + "\n")
    names = ["student", "teacher"] + (["student_ckpt"] if args.ckpt_student_layers else [])
    if all(os.path.isfile(os.path.join(root, name, "config.json")) for name in names):
        return
    from transformers import AutoModelForCausalLM

    from megatron_tsdkd.models.builder import padded_vocab_size
    from megatron_tsdkd.models.dtypes import DTYPES

    size = tokenizer_size(args)
    start = time.perf_counter()
    tok = make_tokenizer(size, os.path.join(root, "tokenizer")) if size else None
    tok, configs = _all_configs(args, tok)
    too_small = [c.vocab_size for c in configs.values() if c.vocab_size < len(tok)]
    if too_small:
        raise SystemExit(f"error: embedding rows {too_small[0]} < tokenizer size {len(tok)}; raise --vocab")
    print(f"vocabulary: tokenizer {len(tok)} tokens ("
          + (f"synthetic byte BPE built in {time.perf_counter() - start:.1f} s" if size else "the demo's")
          + f"); embedding rows student {configs['student'].vocab_size}, teacher {configs['teacher'].vocab_size}; "
          f"losses and sampling over {len(tok)} real of "
          f"{max(padded_vocab_size(c.vocab_size, 1) for c in configs.values())} padded columns (ours), the HF-style "
          f"step over {min(c.vocab_size for c in configs.values())}", flush=True)
    dtype = DTYPES[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed, (name, config) in enumerate(configs.items()):
        folder = os.path.join(root, name)
        if os.path.isfile(os.path.join(folder, "config.json")):
            continue
        torch.manual_seed(seed)
        start = time.perf_counter()
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)   # initialise in the target dtype, on the device: a 7B model in seconds
        try:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config)
        finally:
            torch.set_default_dtype(default)
        built = time.perf_counter() - start
        model.save_pretrained(folder, max_shard_size="4GB")
        tok.save_pretrained(folder)
        params = sum(p.numel() for p in model.parameters())
        del model
        seconds = time.perf_counter() - start
        written = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        print(f"made random {name}: {_count(params)} parameters, {config.num_hidden_layers} layers, hidden "
              f"{config.hidden_size}, vocab {config.vocab_size}, {args.dtype}, in {seconds:.1f} s (written "
              f"{written / GIB:.2f} GiB in {seconds - built:.1f} s) -> {folder}", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()


CHECKPOINT_BYTES_PER_PARAMETER = 14   # a training checkpoint: bf16 weights, fp32 main weights, Adam's two fp32 moments


def _parameters(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):   # counted by transformers, nothing allocated
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def disk_estimate(args) -> tuple[int, int, int, int]:
    """(bytes benchmarks/gpu_check.sh writes at these shapes, bytes one teacher layer adds to that, the teacher's
    layers counted, its config's own layers): the models in
    ``--dtype``; the checkpoint/resume/export run's two checkpoints (``checkpoint.keep_last=1`` keeps the previous
    one until the next is complete) and its export, of student_ckpt/ when ``--ckpt-student-layers`` is given, else of
    the student; plus 10% and 1 GiB to spare."""
    _, configs = _all_configs(args)
    counts = {name: _parameters(config) for name, config in configs.items()}
    width = DTYPE_BYTES[args.dtype]
    trained = counts.get("student_ckpt", counts["student"])
    need = sum(counts.values()) * width + 2 * trained * CHECKPOINT_BYTES_PER_PARAMETER + trained * width
    teacher = configs["teacher"]
    per_layer = (_parameters(_with_layers(teacher, 2)) - _parameters(_with_layers(teacher, 1))) * width
    own = teacher.num_hidden_layers
    if args.teacher_config:   # the shipped config's depth, before --teacher-layers / --layers
        from transformers import AutoConfig

        path = args.teacher_config
        own = AutoConfig.from_pretrained(path if os.path.isabs(path) else os.path.join(REPO, path)).num_hidden_layers
    return int(need * 1.1) + GIB, int(per_layer * 1.1), teacher.num_hidden_layers, own


# ---------------------------------------------------------------------------------------------------------------
# Measurements (each in its own process: --run ours|hf --json FILE)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _memory_start() -> dict:
    if not torch.cuda.is_available():
        return {}
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    return {"context_bytes": total - free, "device_total_bytes": total}


def _memory_end(start: dict) -> dict:
    out = dict(start, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(), device_used_end_bytes=total - free,
                   device_name=torch.cuda.get_device_name())
    return out


def _spec_dict(spec) -> dict:
    return {k: getattr(spec, k) for k in ("num_layers", "hidden_size", "num_heads", "num_query_groups", "head_dim",
                                          "ffn_hidden_size", "vocab_size", "tie_embeddings")}


def train_overrides(args, root: str) -> list[str]:
    """The config overrides of our measured step (also what gpu_check.sh's training run shares)."""
    return [
        f"models.student.path={root}/student", f"models.teacher.path={root}/teacher", f"data.train={root}/train.jsonl",
        "method.name=tsdkd", f"batch.global_size={args.batch}", f"batch.micro_size={args.micro or args.batch}",
        f"precision.dtype={args.dtype}", f"rollout.max_new_tokens={args.new_tokens}", "rollout.on_policy_prob=1",
        # one step more than run: no measured step is the last, which computes the diagnostics (logging.*)
        f"schedule.max_steps={args.steps + 2}", f"checkpoint.dir={root}/ck", "checkpoint.resume=none",
        "logging.progress_bar=false", f"logging.dir={root}/tb", f"data.max_length={args.prompt_length + args.new_tokens}",
        f"data.max_prompt_length={args.prompt_length}", "memory.enforce=false"]


def _measure(args, cfg) -> dict:
    """Warm-up, then ``--steps`` steps of the trainer of ``cfg`` (its ``batches_of`` seam watched for the step's
    shapes); the trainer's time/* metrics, row lengths, peak memory and the plan."""
    from megatron_tsdkd.engines.trainer import build_trainer
    from megatron_tsdkd.planning.memory_plan import GIB as PLAN_GIB, RUNTIME_RESERVE

    memory = _memory_start()
    shapes = []
    trainer = build_trainer(cfg)
    collate, max_length = trainer.batches_of, cfg.data.max_length

    def recording(rollout, examples):   # the benchmark only watches the step's shapes (engines/trainer.py seam)
        batches, length = collate(rollout, examples)
        shapes.append(([min(len(p) + len(r), max_length) for p, r in rollout.pairs], length))
        return batches, length

    trainer.batches_of = recording
    plan = trainer.plan.memory
    trainer.train_step()  # warm-up
    _sync()
    steps = []
    for _ in range(args.steps):
        start = time.perf_counter()
        metrics = trainer.train_step().metrics
        _sync()
        steps.append({"wall": time.perf_counter() - start, "metrics": metrics,
                      "rows": shapes[-1][0], "padded_length": shapes[-1][1]})
    inputs = trainer.inputs
    return {
        "steps": steps, "micro_batch": trainer.plan.micro_size,   # batch.micro_size=auto resolved by the plan
        "dtype": cfg.precision.dtype, "student": _spec_dict(inputs.student.arch),
        "teacher": _spec_dict(inputs.teacher.arch) if inputs.teacher is not None else None,
        "padded_vocab": plan.padded_vocab, "tokenizer_vocab": trainer.tokens.vocab_size,
        "plan_peak_bytes": max(plan.peaks), "plan_reserve_bytes": RUNTIME_RESERVE,
        "plan_capacity_gib": plan.capacity / PLAN_GIB, "plan_layout": plan.layout_line(),
        **_memory_end(memory),
    }


def ours(args, root: str, attention: str) -> dict:
    """Our trainer's step (the megatron engine) with ``models.attention=attention``."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.models.attention import resolve_attention_backend

    cfg = load_config(None, train_overrides(args, root) + [f"models.attention={attention}"])
    return {"attention": resolve_attention_backend(attention), **_measure(args, cfg)}


def ours_deepspeed(args, root: str) -> dict:
    """The same step on ``engine=deepspeed`` (engines/deepspeed/engine.py: HF models, ZeRO-``--zero-stage``,
    transformers' generate), reported like ``ours`` so the two engines' phases line up."""
    from megatron_tsdkd.config import load_config

    cfg = load_config(None, train_overrides(args, root) + ["engine=deepspeed", f"deepspeed.zero_stage={args.zero_stage}"])
    return {"attention": "sdpa (transformers)", "engine": f"deepspeed ZeRO-{args.zero_stage}",
            **_measure(args, cfg)}


def hf_reference(args, root: str) -> dict:
    """The reference recipe: HF generate with its KV cache, then both models' full-vocabulary logits and a dense
    TSD-KD loss (benchmarks/loss_memory.py's transcription), AdamW step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loss_memory import dense_tsdkd
    from megatron_tsdkd.data import load_chat_dataset
    from megatron_tsdkd.losses import TSDKDLossConfig

    memory = _memory_start()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from megatron_tsdkd.models.dtypes import DTYPES

    dtype = DTYPES[args.dtype]
    student = AutoModelForCausalLM.from_pretrained(f"{root}/student", dtype=dtype).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(f"{root}/teacher", dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(f"{root}/student")
    examples = load_chat_dataset(f"{root}/train.jsonl", tok, mode="on_policy",
                                 max_length=args.prompt_length + args.new_tokens,
                                 max_prompt_length=args.prompt_length).examples
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    cfg = TSDKDLossConfig()
    steps = []
    for step in range(args.steps + 1):
        batch = examples[step * args.batch:(step + 1) * args.batch]
        width = max(len(e.prompt_ids) for e in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, e in enumerate(batch):
            ids[i, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
            attn[i, width - len(e.prompt_ids):] = 1
        ids, attn = ids.to(device), attn.to(device)
        _sync()
        marks = [time.perf_counter()]
        with torch.no_grad():
            out = student.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   pad_token_id=tok.pad_token_id)
        _sync()
        marks.append(time.perf_counter())
        full_attn = torch.cat([attn, torch.ones_like(out[:, width:])], dim=1)
        mask = torch.zeros(out.shape, dtype=torch.float32, device=device)
        mask[:, width - 1:-1] = 1.0
        with torch.no_grad():
            t_logits = teacher(input_ids=out, attention_mask=full_attn).logits
        _sync()
        marks.append(time.perf_counter())
        s_logits = student(input_ids=out, attention_mask=full_attn).logits
        rows = mask.flatten().bool()
        n = int(rows.sum())
        vocab = min(s_logits.shape[-1], t_logits.shape[-1])   # Qwen2.5: 151,936 (1.5B) vs 152,064 (7B) rows
        loss = dense_tsdkd(s_logits[..., :vocab].flatten(0, 1)[rows].unsqueeze(0),
                           t_logits[..., :vocab].flatten(0, 1)[rows].unsqueeze(0), torch.ones(1, n, device=device), cfg)
        loss.backward()
        _sync()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad()
        _sync()
        marks.append(time.perf_counter())
        del t_logits, s_logits, loss
        if step:  # real tokens: prompts + the forced new tokens (left padding not counted)
            tokens = int(attn.sum()) + out.shape[0] * (out.shape[1] - width)
            phases = dict(zip(("generate", "teacher_forward", "student_forward_loss_backward", "optimizer"),
                              (b - a for a, b in zip(marks, marks[1:]))))
            steps.append({"wall": marks[-1] - marks[0], "tokens": tokens, "phases": phases})
    return {"steps": steps, **_memory_end(memory)}


# ---------------------------------------------------------------------------------------------------------------
# Figures


def matmul_parameters(spec: dict, vocab: int) -> int:
    """Parameters that take part in a matmul per token: every layer's projections and the LM head."""
    h, d = spec["hidden_size"], spec["head_dim"]
    layer = h * (spec["num_heads"] + 2 * spec["num_query_groups"]) * d + spec["num_heads"] * d * h
    layer += 3 * h * spec["ffn_hidden_size"]
    return spec["num_layers"] * layer + h * vocab


def model_flops(spec: dict, vocab: int, rows: list[int], passes: int) -> float:
    """FLOPs of ``passes`` (1: forward, 3: forward + backward) over sequences of lengths ``rows``: 2 * N per token
    per pass, plus causal attention (QK^T and PV, half the s x s square) 2 * layers * heads * head_dim * s^2."""
    n = matmul_parameters(spec, vocab)
    attention = 2 * spec["num_layers"] * spec["num_heads"] * spec["head_dim"] * sum(s * s for s in rows)
    return passes * (2 * n * sum(rows) + attention)


def peak_flops(device_name: str) -> tuple[float | None, str]:
    env = os.environ.get("TSDKD_PEAK_FLOPS")
    if env:
        return float(env), "TSDKD_PEAK_FLOPS"
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return value, f"{key} table"
    return None, "unknown device"


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


PHASE_ORDER = ("time/rollout", "time/teacher_forward", "time/student_forward", "time/student_backward",
               "time/optimizer", "time/step")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def _label(run_key: str, run: dict) -> str:
    """A run's name in the summary: ``micro auto`` shows the size the memory plan chose."""
    return run_key.replace("micro auto", f"micro auto={run.get('micro_batch', '?')}")


def summarise(args, runs: dict) -> list[str]:
    lines = []
    on_gpu = torch.cuda.is_available()
    first = next(iter(r for k, r in runs.items() if k != "hf"))
    device_name = first.get("device_name", "CPU")
    student, teacher, vocab = first["student"], first["teacher"], first["padded_vocab"]
    names = {k: _label(k, r) for k, r in runs.items()}
    micro = ", ".join(sorted({str(r["micro_batch"]) for k, r in runs.items() if k != "hf"}, key=str))
    lines.append(f"==== step throughput: {args.shape_label}, {device_name}, {args.dtype}, batch {args.batch} "
                 f"(micro {micro}), prompt <= {args.prompt_length} + {args.new_tokens} new tokens, "
                 f"mean of {args.steps} measured step(s) after 1 warm-up ====")
    lines.append(f"student: {_count(matmul_parameters(student, vocab))} matmul parameters, "
                 f"{student['num_layers']} layers, hidden {student['hidden_size']}; teacher: "
                 f"{_count(matmul_parameters(teacher, vocab))}, {teacher['num_layers']} layers, hidden "
                 f"{teacher['hidden_size']}; padded vocabulary {vocab} (tokenizer {first['tokenizer_vocab']})")
    figures = {}
    for name, run in runs.items():
        if name == "hf":
            tokens = sum(s["tokens"] for s in run["steps"])
            figures[name] = {"tps": tokens / sum(s["wall"] for s in run["steps"])}
            continue
        steps = run["steps"]
        real = sum(sum(s["rows"]) for s in steps)
        padded_rows = [[s["padded_length"]] * len(s["rows"]) for s in steps]
        student_time = sum(s["metrics"]["time/student_forward"] + s["metrics"]["time/student_backward"] for s in steps)
        teacher_time = sum(s["metrics"]["time/teacher_forward"] for s in steps)
        figures[name] = {
            "tps": real / sum(s["wall"] for s in steps),
            "student_time": student_time / len(steps),
            "student_flops_real": sum(model_flops(student, vocab, s["rows"], 3) for s in steps) / student_time,
            "student_flops_padded": sum(model_flops(student, vocab, r, 3) for r in padded_rows) / student_time,
            "teacher_flops": sum(model_flops(teacher, vocab, r, 1) for r in padded_rows) / max(teacher_time, 1e-12),
            "phases": {k: _mean(s["metrics"][k] for s in steps)
                       for k in sorted((k for k in steps[0]["metrics"] if k.startswith("time/")),
                                       key=lambda k: (PHASE_ORDER + (k,)).index(k))},
            "wall": _mean(s["wall"] for s in steps),
            "response": _mean(s["metrics"]["rollout/response_length"] for s in steps),
        }
    ours_names = [n for n in runs if n != "hf"]
    main = ours_names[0]
    tps = ", ".join(f"ours ({names[n]}) {figures[n]['tps']:.1f}" for n in ours_names)
    if "hf" in figures:
        ratio = figures[main]["tps"] / figures["hf"]["tps"]
        lines.append(f"tokens/s: {tps}, HF-style {figures['hf']['tps']:.1f}; ours ({names[main]}) / HF-style "
                     f"{ratio:.2f}x (target >= 5x)")
    else:
        lines.append(f"tokens/s: {tps}")
    peak, source = peak_flops(device_name) if on_gpu else (None, "CPU")
    parts = []
    for n in ours_names:
        f = figures[n]
        if peak:
            parts.append(f"{names[n]} {100 * f['student_flops_real'] / peak:.1f}% (padded tokens "
                         f"{100 * f['student_flops_padded'] / peak:.1f}%)")
        else:
            parts.append(f"{names[n]} {f['student_flops_real'] / 1e9:.2f} GFLOP/s")
    if peak:
        lines.append(f"student fwd/bwd MFU: {', '.join(parts)} of {peak / 1e12:.0f} TFLOP/s bf16 peak ({source}); "
                     f"target >= 40%")
        lines.append("teacher forward MFU: " + ", ".join(
            f"{names[n]} {100 * figures[n]['teacher_flops'] / peak:.1f}%" for n in ours_names))
    else:
        lines.append(f"student fwd/bwd MFU: n/a ({source}: no peak FLOP/s; set TSDKD_PEAK_FLOPS); achieved "
                     f"{', '.join(parts)}")
    for n in ours_names:
        run = runs[n]
        plan = run["plan_peak_bytes"]
        if on_gpu:
            alloc, reserved, context = run["peak_allocated_bytes"], run["peak_reserved_bytes"], run["context_bytes"]
            lines.append(f"peak GPU memory ({names[n]}): {alloc / GIB:.2f} GiB allocated, {reserved / GIB:.2f} GiB "
                         f"reserved, {context / GIB:.2f} GiB CUDA context; device in use at the end "
                         f"{run['device_used_end_bytes'] / GIB:.2f} of {run['device_total_bytes'] / GIB:.0f} GiB")
            lines.append(f"planner peak ({names[n]}): {plan / GIB:.2f} GiB predicted (incl. "
                         f"{run['plan_reserve_bytes'] / GIB:.0f} GiB runtime reserve); measured/predicted "
                         f"{(reserved + context) / plan:.2f} (reserved + context), allocated/(predicted - reserve) "
                         f"{alloc / max(plan - run['plan_reserve_bytes'], 1):.2f} (target 0.85-1.15)")
        else:
            lines.append(f"peak GPU memory ({names[n]}): n/a on CPU (peak RSS {run['peak_rss_bytes'] / GIB:.2f} GiB)")
            lines.append(f"planner peak ({names[n]}): {plan / GIB:.2f} GiB predicted for a GPU; measured/predicted "
                         f"n/a on CPU")
    if "hf" in runs and on_gpu:
        hf = runs["hf"]
        lines.append(f"peak GPU memory (HF-style): {hf['peak_allocated_bytes'] / GIB:.2f} GiB allocated")
    for n in ours_names:
        f = figures[n]
        lines.append(f"phase seconds (ours, {names[n]}): "
                     + ", ".join(f"{k[5:]} {v:.3f}" for k, v in f["phases"].items())
                     + f", wall {f['wall']:.3f} (mean response {f['response']:.1f} tokens)")
    for n in ours_names:
        lines.append(f"steps ({names[n]}, {runs[n]['dtype']}): " + step_health(runs[n]["steps"]))
    if "hf" in runs:
        hf_steps = runs["hf"]["steps"]
        lines.append("phase seconds (HF-style): " + ", ".join(
            f"{k} {_mean(s['phases'][k] for s in hf_steps):.3f}" for k in hf_steps[0]["phases"])
            + f", step {_mean(s['wall'] for s in hf_steps):.3f}")
    if "deepspeed" in figures and main != "deepspeed":
        m, d = figures[main], figures["deepspeed"]
        lines.append(f"ratio megatron ({names[main]}) vs {runs['deepspeed']['engine']}: tokens/s "
                     f"{m['tps'] / d['tps']:.2f}x, student fwd+bwd time {d['student_time'] / m['student_time']:.2f}x "
                     f"faster; rollout "
                     f"{d['phases'].get('time/rollout', 0.0) / max(m['phases'].get('time/rollout', 0.0), 1e-9):.2f}x "
                     f"faster (megatron {m['phases'].get('time/rollout', 0.0):.3f} s, deepspeed "
                     f"{d['phases'].get('time/rollout', 0.0):.3f} s)")
    if "sdpa" in figures and "local" in figures:
        s, l = figures["sdpa"], figures["local"]
        lines.append(f"ratio SDPA vs local attention: tokens/s {s['tps'] / l['tps']:.2f}x, student fwd+bwd time "
                     f"{l['student_time'] / s['student_time']:.2f}x faster (sdpa {s['student_time']:.3f} s, local "
                     f"{l['student_time']:.3f} s)")
    if "micro 1" in figures and "micro auto" in figures:
        one, auto = figures["micro 1"], figures["micro auto"]
        lines.append(f"ratio micro auto={runs['micro auto']['micro_batch']} vs micro 1: tokens/s "
                     f"{auto['tps'] / one['tps']:.2f}x, student fwd+bwd time "
                     f"{one['student_time'] / auto['student_time']:.2f}x faster (micro 1 {one['student_time']:.3f} s, "
                     f"auto {auto['student_time']:.3f} s)")
    return lines


def step_health(steps: list) -> str:
    """The measured steps' losses (finite or not), skipped updates, fp16's loss scale and the rollout guard's
    log-probability difference, as one summary phrase."""
    losses = [s["metrics"].get("loss/total", float("nan")) for s in steps]
    finite = all(math.isfinite(v) for v in losses)
    scales = [s["metrics"].get("optim/loss_scale", 1.0) for s in steps]
    text = (f"loss/total {', '.join(f'{v:.4f}' for v in losses)} ({'finite' if finite else 'NOT FINITE'}); "
            f"updates skipped {sum(int(s['metrics'].get('optim/update_skipped', 0.0)) for s in steps)} of "
            f"{len(steps)}; loss scale {' -> '.join(f'{v:g}' for v in scales)}")
    diffs = [s["metrics"]["rollout/logprob_diff"] for s in steps if "rollout/logprob_diff" in s["metrics"]]
    if diffs:
        text += f"; rollout/logprob_diff {', '.join(f'{v:.2g}' for v in diffs)}"
    return text


class ChildFailed(RuntimeError):
    pass


def _child(args, what: str, attention: str, root: str, out: str, extra: list[str], timeout: float) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--run", what, "--attention", attention, "--json", out,
            "--models-dir", root] + args.passthrough + extra
    start = time.perf_counter()
    try:
        subprocess.run(argv, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"timed out after {timeout:.0f} s") from None
    except subprocess.CalledProcessError as error:
        raise ChildFailed(f"exit status {error.returncode}") from None
    with open(out) as f:
        result = json.load(f)
    print(f"[step_throughput] {what}{' ' + attention if attention else ''}{' ' + ' '.join(extra) if extra else ''} "
          f"done in {time.perf_counter() - start:.1f} s", flush=True)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES) + ["tiny"], default="tiny",
                   help="model shapes: a pair of shipped HF configs, or the --student-*/--teacher-* tiny shapes")
    p.add_argument("--student-config", help="HF config folder (or config.json) of the student; with --teacher-config")
    p.add_argument("--teacher-config")
    p.add_argument("--layers", type=int, default=0, help="with HF configs: keep only this many layers of each model "
                   "(0: all)")
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--student-layers", type=int, help="tiny shapes: layers (default 4); with HF configs: keep only "
                   "this many of the student's layers (default --layers)")
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, help="tiny shapes: layers (default 6); with HF configs: keep only "
                   "this many of the teacher's layers (default --layers)")
    p.add_argument("--ckpt-student-layers", type=int, default=0,
                   help="also write student_ckpt/: the student with this many layers (gpu_check.sh's checkpoint run)")
    p.add_argument("--vocab", type=int, default=32768, help="embedding rows of the tiny shapes")
    p.add_argument("--tokenizer-vocab", type=int, default=0,
                   help=f"tokens of the synthetic tokenizer (default: {QWEN25_TOKENIZER_SIZE:,}, Qwen2.5's, with HF "
                        f"configs; 0 with tiny shapes: the demo's 102-token tokenizer)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--micro", default="", help="sequences per micro-batch, or auto (the memory plan's largest that "
                   "fits); default: --batch")
    p.add_argument("--micro-sizes", default="", help="comma-separated --micro values, one run of ours each "
                   "(e.g. 1,auto)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=64, help="data.max_prompt_length")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="fp32")
    p.add_argument("--attentions", default="sdpa,local", help="our runs to compare, comma-separated")
    p.add_argument("--no-hf", action="store_true", help="skip the HF-style reference step")
    p.add_argument("--eval-count", type=int, default=16, help="problems in the eval.jsonl written with the models")
    p.add_argument("--models-dir", default="", help="keep (and reuse) the models and data here")
    p.add_argument("--prepare-only", action="store_true", help="build the models and data, then stop")
    p.add_argument("--disk-estimate", action="store_true",
                   help="print 'disk_needed_bytes N' and 'disk_teacher_layer_bytes N' for benchmarks/gpu_check.sh at "
                        "these shapes; build nothing")
    p.add_argument("--child-timeout", type=float, default=600, help="seconds for each measured run")
    p.add_argument("--time-limit", type=float, default=0, help="seconds for all runs together (0: none): a run "
                   "that would outlast it is cut short or not started, and the summary holds the runs that ended")
    p.add_argument("--engines", default="megatron", help="engines to measure, comma-separated: megatron (one run per "
                   "--attentions entry), deepspeed (engine=deepspeed, HF models under ZeRO)")
    p.add_argument("--zero-stage", type=int, default=3, choices=(2, 3), help="with --engines ...deepspeed")
    p.add_argument("--run", choices=("ours", "deepspeed", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--attention", default="sdpa", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    began = time.perf_counter()
    if args.shapes != "tiny" and not args.student_config:
        args.student_config, args.teacher_config = SHAPES[args.shapes]
    if bool(args.student_config) != bool(args.teacher_config):
        p.error("--student-config and --teacher-config go together")
    if not args.student_config:
        args.student_layers = args.student_layers or 4
        args.teacher_layers = args.teacher_layers or 6
    kept = [f"{who} layers={n}" for who, n in (("student", args.student_layers), ("teacher", args.teacher_layers))
            if n is not None]
    args.shape_label = (f"{args.shapes}" + (f" (layers={args.layers})" if args.layers else "")
                        + (f" ({', '.join(kept)})" if kept else "") if args.shapes != "tiny" else
                        f"{os.path.basename(os.path.normpath(args.student_config))} / "
                        f"{os.path.basename(os.path.normpath(args.teacher_config))}" if args.student_config else
                        f"tiny (student {args.student_hidden}x{args.student_layers}, teacher "
                        f"{args.teacher_hidden}x{args.teacher_layers}, vocab {args.vocab})")

    if args.disk_estimate:
        need, per_teacher_layer, layers, own = disk_estimate(args)
        print(f"disk_needed_bytes {need}\ndisk_teacher_layer_bytes {per_teacher_layer}\nteacher_layers {layers}\n"
              f"teacher_layers_all {own}")
        return
    if args.run:  # a child: one measurement, written as JSON
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("megatron_tsdkd.train").setLevel(logging.INFO)   # its start-up choices (micro_size=auto)
        if args.run == "ours":
            result = ours(args, args.models_dir, args.attention)
        elif args.run == "deepspeed":
            result = ours_deepspeed(args, args.models_dir)
        else:
            result = hf_reference(args, args.models_dir)
        with open(args.json, "w") as f:
            json.dump(result, f)
        return

    import tempfile

    root = args.models_dir or tempfile.mkdtemp(prefix="tsdkd_bench_")
    make_models(args, root)
    if args.prepare_only:
        return
    # the children get the same shape/size options (minus the orchestration ones)
    skip = {"--models-dir", "--prepare-only", "--attentions", "--engines", "--no-hf", "--child-timeout",
            "--time-limit", "--micro-sizes"}
    args.passthrough, it = [], iter(sys.argv[1:] if argv is None else argv)
    for item in it:
        key = item.split("=", 1)[0]
        if key in skip:
            if "=" not in item and key not in ("--prepare-only", "--no-hf"):
                next(it, None)
            continue
        args.passthrough.append(item)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"megatron", "deepspeed"}
    if unknown:
        p.error(f"--engines: unknown {', '.join(sorted(unknown))} (megatron, deepspeed)")
    attentions = [a.strip() for a in args.attentions.split(",") if a.strip()]
    micro_sizes = [m.strip() for m in args.micro_sizes.split(",") if m.strip()] or [args.micro or str(args.batch)]
    planned = []   # (key, what, attention, extra argv)
    if "megatron" in engines:
        for attention in attentions:
            for micro in micro_sizes:
                if len(micro_sizes) == 1:
                    key = attention
                else:
                    key = f"micro {micro}" if len(attentions) == 1 else f"{attention}, micro {micro}"
                planned.append((key, "ours", attention, ["--micro", micro] if args.micro_sizes else []))
    if "deepspeed" in engines:
        planned.append(("deepspeed", "deepspeed", "", []))
    if not args.no_hf:
        planned.append(("hf", "hf", "", []))
    runs, failures = {}, []
    for key, what, attention, extra in planned:
        timeout = args.child_timeout
        if args.time_limit:
            timeout = min(timeout, args.time_limit - (time.perf_counter() - began) - 5)
            if timeout < 10:
                failures.append(f"run {key}: not started ({args.time_limit:.0f} s time limit)")
                continue
        out = os.path.join(root, "run_" + "".join(c if c.isalnum() else "_" for c in key) + ".json")
        try:
            runs[key] = _child(args, what, attention, root, out, extra, timeout)
        except ChildFailed as error:   # the runs that ended still make a summary
            failures.append(f"run {key} FAILED: {error}")
            print(f"[step_throughput] {failures[-1]}", flush=True)
    with open(os.path.join(root, "step_throughput.json"), "w") as f:
        json.dump(runs, f, indent=1)
    if any(k != "hf" for k in runs):
        print("\n".join(summarise(args, runs)), flush=True)
    for key, run in runs.items():
        if key != "hf" and not all(math.isfinite(s["metrics"].get("loss/total", float("nan"))) for s in run["steps"]):
            failures.append(f"run {_label(key, run)}: a measured step's loss/total is not finite")
    if failures:
        print("\n".join(failures), flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
