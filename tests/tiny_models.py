"""Tiny random Hugging Face decoders (Qwen2, Qwen3, Qwen3-MoE, Llama 3) saved to a folder, for tests; no hub access.

``make_tiny_hf_model(arch, out_dir, tie=False, seed=0)`` writes config.json, generation_config.json, safetensors
weights and a byte-level tokenizer with a chat template, and returns the folder. Every parameter is random,
norms included (around 1), so a wrong mapping of any tensor changes the logits.
"""
from __future__ import annotations

import os

import torch

ARCHS = ("qwen2", "qwen3", "qwen3_moe", "llama")
VOCAB_SIZE = 300        # not a multiple of 128: exercises vocabulary padding (TP=1 -> 384, TP=2 -> 512)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(arch: str, tie: bool = False, **overrides):
    """A 2-layer config with GQA (4 heads, 2 query groups) and non-default rope settings."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen2":
        config = Qwen2Config(**common, max_position_embeddings=4096, rope_theta=1_000_000.0)
    elif arch == "qwen3":  # head_dim 32 != hidden / heads = 16, as in real Qwen3 models
        config = Qwen3Config(**common, head_dim=32, max_position_embeddings=4096, rope_theta=1_000_000.0)
    elif arch == "qwen3_moe":  # 8 experts, top-2 renormalised (as Qwen3-30B-A3B), narrower experts than a dense MLP
        config = Qwen3MoeConfig(**common, head_dim=32, max_position_embeddings=4096, rope_theta=1_000_000.0,
                                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                                router_aux_loss_coef=0.01)
    elif arch == "llama":  # Llama 3.1 rope scaling (only the factor is non-standard)
        config = LlamaConfig(**common, max_position_embeddings=131072, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}, rope_theta=500_000.0)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_tokenizer(out_dir: str):
    """A byte-level BPE tokenizer without merges (256 byte tokens + specials), with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def make_tiny_hf_model(arch: str, out_dir: str, tie: bool = False, seed: int = 0, dtype=torch.float32,
                       tokenizer: bool = True, **config_overrides) -> str:
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = tiny_config(arch, tie=tie, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight"):   # a MoE router: clear top-k choices, no near-ties to flip
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(0.08 * torch.randn_like(param))
    model = model.to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.7,
                     top_p=0.8).save_pretrained(out_dir)
    if tokenizer:
        make_tokenizer(out_dir)
    return out_dir


def write_problems(path, count: int, seed: int = 7) -> None:
    """A JSONL data set of the demo's arithmetic problems (prompt, worked response, answer)."""
    import json

    from megatron_tsdkd.data.arithmetic_chains import make_problems

    with open(path, "w") as f:
        for p in make_problems(seed=seed, count=count):
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution, "answer": p.answer}) + "\n")
