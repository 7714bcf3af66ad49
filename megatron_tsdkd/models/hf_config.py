"""Read a Hugging Face config and reduce it to the few facts the megatron model and the weight mapping need.

``ArchSpec`` is the single, validated description of a decoder (Qwen2/Qwen2.5, Qwen3, Qwen3-MoE, Llama 2/3.x) that the
builder, the weight mapping, the loader and the exporter share; every unsupported option stops here with one
sentence naming it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from megatron_tsdkd.models.errors import ParallelLayoutError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")
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
    # mixture of experts (qwen3_moe): every layer's MLP is a router over num_experts SwiGLU experts of width
    # moe_ffn_hidden_size, moe_top_k of them per token; 0 for a dense model
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = False  # the top-k probabilities renormalised to sum to one (HF norm_topk_prob)
    router_aux_loss_coef: float = 0.0  # the HF config's load-balancing coefficient (a MoE student's default)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


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
    moe = _moe_fields(config, name)

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
        norm_eps=float(config.rms_norm_eps),
        rope_theta=theta,
        rope_type=rope_type,
        rope_factor=factor if rope_type != "default" else None,
        max_position_embeddings=config.max_position_embeddings,
        init_std=float(getattr(config, "initializer_range", 0.02)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        **moe,
    )


def _moe_fields(config, name: str) -> dict:
    """ArchSpec's mixture-of-experts fields; refuses a MoE layout megatron-core's layers here cannot reproduce."""
    experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0)
    if config.model_type != "qwen3_moe":
        if experts:
            raise UnsupportedModelError(f"{name}: mixture-of-experts layers are supported for qwen3_moe only")
        return {}
    if getattr(config, "mlp_only_layers", None):
        raise UnsupportedModelError(f"{name}: mlp_only_layers {list(config.mlp_only_layers)} (dense layers among "
                                    f"MoE layers) are not supported")
    if getattr(config, "decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError(f"{name}: decoder_sparse_step {config.decoder_sparse_step} is not supported "
                                    f"(only 1: every layer a MoE layer)")
    top_k = int(config.num_experts_per_tok)
    if not 1 <= top_k <= experts:
        raise UnsupportedModelError(f"{name}: num_experts_per_tok {top_k} must be between 1 and num_experts "
                                    f"{experts}")
    return dict(num_experts=experts, moe_top_k=top_k, moe_ffn_hidden_size=int(config.moe_intermediate_size),
                moe_norm_topk_prob=bool(getattr(config, "norm_topk_prob", False)),
                router_aux_loss_coef=float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0))


def check_parallel_layout(config, tp: int, pp: int, padded_vocab: Optional[int] = None, ep: int = 1,
                          trained: bool = False) -> None:
    """Raise ParallelLayoutError (one sentence) unless the model splits evenly over TP x PP (x EP: its experts;
    each expert is split over TP as megatron-core's default expert tensor parallelism does). ``trained``: the
    student, which as a mixture of experts trains at TP = 1 only (megatron-core's MoE layers need sequence
    parallelism under tensor parallelism in training, which this trainer does not run)."""
    spec = config if isinstance(config, ArchSpec) else arch_spec(config)
    name = f"{spec.model_type} model"
    if tp < 1 or pp < 1 or ep < 1:
        raise ParallelLayoutError(f"tensor ({tp}), pipeline ({pp}) and expert ({ep}) parallel sizes must be at "
                                  f"least 1")
    if ep > 1 and not spec.is_moe:
        raise ParallelLayoutError(f"{name}: expert parallel {ep} needs a mixture-of-experts model; this one is dense")
    if spec.is_moe and spec.num_experts % ep:
        raise ParallelLayoutError(f"{name}: {spec.num_experts} experts are not divisible by expert parallel {ep}")
    if trained and spec.is_moe and tp > 1:
        raise ParallelLayoutError(f"{name}: a trained mixture-of-experts model runs at tensor parallel 1 only "
                                  f"(megatron-core's MoE layers need sequence parallelism under tensor parallelism "
                                  f"in training, which this trainer does not run); split it with expert and "
                                  f"pipeline parallelism instead, got tensor parallel {tp}")
    if spec.is_moe and spec.moe_ffn_hidden_size % tp:
        raise ParallelLayoutError(f"{name}: moe_intermediate_size {spec.moe_ffn_hidden_size} is not divisible by "
                                  f"tensor parallel {tp}")
    if spec.num_heads % tp:
        raise ParallelLayoutError(f"{name}: {spec.num_heads} attention heads are not divisible by tensor parallel {tp}")
    if spec.num_query_groups % tp:
        raise ParallelLayoutError(f"{name}: {spec.num_query_groups} key/value heads (query groups) are not divisible "
                                  f"by tensor parallel {tp}")
    if not spec.is_moe and spec.ffn_hidden_size % tp:
        raise ParallelLayoutError(f"{name}: intermediate_size {spec.ffn_hidden_size} is not divisible by tensor "
                                  f"parallel {tp}")
    if padded_vocab is not None and (padded_vocab % tp or padded_vocab < spec.vocab_size):
        raise ParallelLayoutError(f"{name}: padded vocabulary {padded_vocab} must be >= vocab_size {spec.vocab_size} "
                                  f"and divisible by tensor parallel {tp}")
    if spec.num_layers % pp:
        raise ParallelLayoutError(f"{name}: {spec.num_layers} layers are not divisible by pipeline parallel {pp}")
