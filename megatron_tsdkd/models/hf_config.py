"""Read a Hugging Face config and reduce it to the few facts the megatron model and the weight mapping need.

``ArchSpec`` is the single, validated description of a decoder (Qwen2/Qwen2.5, Qwen3, Llama 2/3.x) that the
builder, the weight mapping, the loader and the exporter share; every unsupported option stops here with one
sentence naming it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from megatron_tsdkd.models.errors import ParallelLayoutError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# megatron-core's llama3 rope scaling takes only the factor; the other three are fixed at these values.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    norm_eps: float
    rope_theta: float
    rope_type: str                    # "default" | "linear" | "llama3"
    rope_factor: Optional[float]      # None for "default"
    max_position_embeddings: int
    init_std: float

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def read_hf_config(hf_dir: str):
    """The transformers config of a local model folder (never the hub), checked to be supported."""
    from transformers import AutoConfig

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir} has no config.json, so it is not a Hugging Face model folder")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as error:
        raise UnsupportedModelError(f"{path} is not valid JSON ({error})") from None
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:  # before transformers, which may not know the type
        arch = ", ".join(raw.get("architectures") or []) or "no architectures entry"
        raise UnsupportedModelError(f"model_type {raw.get('model_type')!r} ({arch}) in {path} is not supported; "
                                    f"supported are {', '.join(SUPPORTED_MODEL_TYPES)}")
    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    arch_spec(config)
    return config


def _rope(config) -> tuple[float, str, Optional[float], dict]:
    """(theta, rope_type, factor, all parameters) from transformers 5 ``rope_parameters`` or 4.x ``rope_scaling``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    if not params:
        params = dict(legacy)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    factor = params.get("factor")
    return float(theta), rope_type, (float(factor) if factor is not None else None), params


def arch_spec(config) -> ArchSpec:
    """Validate ``config`` and describe it; raises UnsupportedModelError naming the unsupported feature."""
    model_type = getattr(config, "model_type", None)
    arch = ", ".join(getattr(config, "architectures", None) or []) or "no architectures entry"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({arch}) is not supported; supported are {', '.join(SUPPORTED_MODEL_TYPES)}")
    name = f"{model_type} model"
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{name}: hidden_act {config.hidden_act!r} is not supported (only silu/SwiGLU)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError(f"{name}: mlp_bias=True is not supported")
    if model_type != "qwen2" and getattr(config, "attention_bias", False):
        raise UnsupportedModelError(f"{name}: attention_bias=True (bias on o_proj) is not supported")
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError(f"{name}: use_sliding_window=True is not supported")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UnsupportedModelError(f"{name}: layer_types {sorted(layer_types)} are not supported "
                                    f"(only full_attention)")
    if getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0):
        raise UnsupportedModelError(f"{name}: mixture-of-experts layers are not supported")

    theta, rope_type, factor, params = _rope(config)
    if rope_type == "llama3":
        different = {k: params.get(k) for k, v in MEGATRON_LLAMA3_ROPE.items() if float(params.get(k, v)) != v}
        if different:
            raise UnsupportedModelError(
                f"{name}: llama3 rope scaling with {different} is not supported (megatron-core fixes "
                f"{MEGATRON_LLAMA3_ROPE})")
    elif rope_type not in ("default", "linear"):
        raise UnsupportedModelError(f"{name}: rope_type {rope_type!r} is not supported (default, linear, llama3)")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise UnsupportedModelError(f"{name}: partial_rotary_factor {partial} is not supported")

    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % groups:
        raise UnsupportedModelError(f"{name}: num_attention_heads {heads} is not a multiple of "
                                    f"num_key_value_heads {groups}")
    return ArchSpec(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        qk_norm=model_type == "qwen3",
        norm_eps=float(config.rms_norm_eps),
        rope_theta=theta,
        rope_type=rope_type,
        rope_factor=factor if rope_type != "default" else None,
        max_position_embeddings=config.max_position_embeddings,
        init_std=float(getattr(config, "initializer_range", 0.02)),
    )


def check_parallel_layout(config, tp: int, pp: int, padded_vocab: Optional[int] = None) -> None:
    """Raise ParallelLayoutError (one sentence) unless the model splits evenly over TP x PP."""
    spec = config if isinstance(config, ArchSpec) else arch_spec(config)
    name = f"{spec.model_type} model"
    if tp < 1 or pp < 1:
        raise ParallelLayoutError(f"tensor ({tp}) and pipeline ({pp}) parallel sizes must be at least 1")
    if spec.num_heads % tp:
        raise ParallelLayoutError(f"{name}: {spec.num_heads} attention heads are not divisible by tensor parallel {tp}")
    if spec.num_query_groups % tp:
        raise ParallelLayoutError(f"{name}: {spec.num_query_groups} key/value heads (query groups) are not divisible "
                                  f"by tensor parallel {tp}")
    if spec.ffn_hidden_size % tp:
        raise ParallelLayoutError(f"{name}: intermediate_size {spec.ffn_hidden_size} is not divisible by tensor "
                                  f"parallel {tp}")
    if padded_vocab is not None and (padded_vocab % tp or padded_vocab < spec.vocab_size):
        raise ParallelLayoutError(f"{name}: padded vocabulary {padded_vocab} must be >= vocab_size {spec.vocab_size} "
                                  f"and divisible by tensor parallel {tp}")
    if spec.num_layers % pp:
        raise ParallelLayoutError(f"{name}: {spec.num_layers} layers are not divisible by pipeline parallel {pp}")
