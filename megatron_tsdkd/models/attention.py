"""Core attention for the layer spec: megatron's local kernel, PyTorch's fused SDPA, or Transformer Engine's.

``attention_layer_spec(backend, spec)`` returns the GPT layer spec that ``build_model`` uses. Every backend keeps
megatron's *local* layer spec (``get_gpt_layer_local_spec``) and swaps only its ``core_attention`` submodule, so
the parameter names, and with them the one HF <-> megatron mapping (mapping.py) and the checkpoints, are the
same for all backends:

    local  megatron's DotProductAttention: materialises the [b, heads, sq, sk] scores (the reference)
    sdpa   SDPADotProductAttention below, on torch.nn.functional.scaled_dot_product_attention: flash /
           memory-efficient kernels on GPU, no [b, heads, s, s] tensor in training
    te     Transformer Engine's TEDotProductAttention (flash / cuDNN fused attention), made padding-aware;
           not run by any test (no machine here has TE)
    auto   te where transformer_engine imports and CUDA is present, else sdpa on GPU, else local

Why this is written by hand: megatron-core's local spec offers no fused attention without Transformer Engine.
Its only SDPA option (``get_gpt_layer_local_spec(use_kitchen=True, kitchen_attention_backend="sdpa")``) needs
NVIDIA Kitchen, which is not distributed (megatron/core/extensions/kitchen.py:3 is a stub, HAVE_KITCHEN = False),
and TE's full spec renames the norm weights (``linear_qkv.layer_norm_weight``) and needs a CUDA build of TE that
does not install here. No installable library plugs SDPA into megatron-core's core-attention interface.

The interface (megatron/core/transformer/dot_product_attention.py, attention.py:1134-1158): query
[sq, b, np, hn], key/value [sk, b, ng, hn] with np a multiple of ng (GQA), ``attention_mask`` a bool tensor
broadcastable to [b, np, sq, sk], True where attention is FORBIDDEN, and ``attn_mask_type`` from the spec
(causal) or AttnMaskType.no_mask once a static KV cache holds earlier positions. Output [sq, b, np * hn].

Mask semantics, identical to the local kernel (fusions/fused_softmax.py:319-329): a given mask is the whole
truth (generation's masks carry causality and left padding, padded_batch.py); without one, a causal layer masks
the future when sq > 1 (bottom-right aligned when sq < sk) and a single query attends to every key. Forbidden
scores get megatron's finite -10000 (transformer/utils.py:50) rather than -inf, so a query whose keys are all
padding (a left-padding position) yields finite garbage instead of NaN; no real position attends to it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron_tsdkd.checks import require
from megatron_tsdkd.runtime.device_choices import auto_attention_backend

ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")
MASKED_SCORE = -10000.0   # megatron's attention_mask_func value (transformer/utils.py:50)


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    """Whether Transformer Engine and megatron-core's TE extension import (TE needs a CUDA build)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions.transformer_engine import TEDotProductAttention  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install is as good as none
        return False
    return True


def check_attention_backend(name) -> str:
    """``name`` if it is one of ATTENTION_BACKENDS, else a one-line ValueError naming it and the choices."""
    require(isinstance(name, str) and name in ATTENTION_BACKENDS, "attention_backend", name,
            "must be one of " + ", ".join(ATTENTION_BACKENDS))
    return name


def resolve_attention_backend(name: str) -> str:
    """The concrete backend ('te', 'sdpa' or 'local') that ``name`` stands for on this machine."""
    check_attention_backend(name)
    if name == "auto":
        return auto_attention_backend(transformer_engine_available)
    if name == "te" and not transformer_engine_available():
        raise ValueError("attention_backend: 'te' needs transformer_engine, which does not import here; "
                         "use 'auto', 'sdpa' or 'local', got 'te'")
    return name


def attention_layer_spec(backend: str, spec):
    """The GPT layer ModuleSpec for ``backend`` (see module doc) and ``spec`` (an ArchSpec: qk norm or not, MoE
    or dense MLP)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    backend = resolve_attention_backend(backend)
    # a MoE model's MLP: megatron's MoELayer with sequential experts (grouped GEMM needs TE or the grouped_gemm
    # package and lays the expert weights out differently)
    layer = get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm",
                                     num_experts=spec.num_experts or None, moe_grouped_gemm=False)
    if backend == "sdpa":
        layer.submodules.self_attention.submodules.core_attention = sdpa_core_attention_class()
    elif backend == "te":
        layer.submodules.self_attention.submodules.core_attention = _te_core_attention_class()
    return layer


# ---------------------------------------------------------------------------------------------------------------
# The SDPA kernel call, in megatron's layout (a plain function: no megatron needed, testable on its own)

def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], *, causal: bool, scale: float,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for query [sq, b, np, hn], key/value [sk, b, ng, hn]; returns
    [sq, b, np * hn]. ``attention_mask``: bool, broadcastable to [b, np, sq, sk], True = forbidden (then
    ``causal`` is ignored, as in megatron's local kernel); None with ``causal``: the future is masked."""
    sq, b, heads, hn = query.shape
    sk, groups = key.shape[0], key.shape[2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # [b, heads, s, hn]: views, hn contiguous

    additive, is_causal = None, False
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask must be a bool tensor (True = masked out), got {attention_mask.dtype}")
        # bool masks become -inf inside SDPA: NaN on fully masked rows (left padding). Use megatron's finite value.
        additive = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
        additive.masked_fill_(attention_mask.to(q.device), MASKED_SCORE)
    elif causal and sq > 1:
        if sq == sk:
            is_causal = True        # flash / memory-efficient kernels take it without a mask tensor
        else:                       # queries are the last sq positions: bottom-right aligned
            future = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
            additive = torch.zeros(sq, sk, dtype=q.dtype, device=q.device).masked_fill_(future, MASKED_SCORE)

    if groups != heads and additive is not None:
        # A mask (generation's left padding): fold each group's heads into its query rows instead of repeating
        # the keys and values to every head (a copy of the whole KV cache per layer per token).
        out = _grouped_attention(q, k, v, additive, scale, dropout_p)
    else:
        native_gqa = False
        if groups != heads:
            # No mask: enable_gqa is honoured by the flash kernel only (half precision, no mask); elsewhere it
            # falls back to the math kernel (whose [s, s] scores training cannot afford), so repeat the kv heads
            # (megatron's own order: head i reads group i // (np / ng)).
            native_gqa = q.dtype in (torch.float16, torch.bfloat16)
            if not native_gqa:
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)
        kwargs = {"enable_gqa": True} if native_gqa else {}
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=additive, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
    return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)     # [sq, b, np * hn]


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, additive: torch.Tensor, scale: float,
                       dropout_p: float) -> torch.Tensor:
    """GQA with an additive mask, without repeating keys and values: query [b, np, sq, hn] becomes
    [b, ng, (np / ng) * sq, hn] (head i = g * rep + r, megatron's order), so each group's heads are extra query
    rows against the group's own keys [b, ng, sk, hn]; the mask is laid out the same way. Any SDPA kernel that
    takes a mask runs it (on CUDA, enable_gqa with a mask falls back to the math kernel, which repeats the heads
    itself; transformers' use_gqa_in_sdpa draws the same line).
    Returns [b, np, sq, hn]."""
    b, heads, sq, hn = q.shape
    groups, sk = k.shape[1], k.shape[2]
    rep = heads // groups
    mask = additive.reshape((1,) * (4 - additive.dim()) + tuple(additive.shape))
    mb, mh = mask.shape[0], mask.shape[1]
    if mh == heads:   # one mask per head: [mb, ng, rep * sq, sk]
        mask = mask.expand(mb, heads, sq, sk).reshape(mb, groups, rep * sq, sk)
    else:             # shared by all heads: repeated over each group's rep query blocks
        mask = mask.expand(mb, 1, sq, sk).unsqueeze(2).expand(mb, 1, rep, sq, sk).reshape(mb, 1, rep * sq, sk)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(b, groups, rep * sq, hn), k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.reshape(b, heads, sq, hn)


# ---------------------------------------------------------------------------------------------------------------
# The megatron modules (built lazily: importing this file must not import megatron-core, config.py reads it)

@functools.lru_cache(maxsize=None)
def sdpa_core_attention_class():
    """SDPADotProductAttention: a drop-in for megatron's DotProductAttention (same constructor and forward)."""
    import math

    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.utils import is_layer_window_attention

    class SDPADotProductAttention(MegatronModule):
        """Core attention on torch's scaled_dot_product_attention; no parameters (same state dict as local)."""

        def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                     attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                     cp_comm_type: Optional[str] = None, pg_collection=None):
            super().__init__(config=config)
            if config.context_parallel_size != 1:
                raise ValueError("attention_backend 'sdpa' does not support context parallelism; use 'te'")
            if config.softmax_type != "vanilla":
                raise ValueError(f"attention_backend 'sdpa' supports softmax_type 'vanilla' only, "
                                 f"got {config.softmax_type!r}")
            if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
                raise ValueError("attention_backend 'sdpa' does not support sliding-window attention; "
                                 "use 'local' or 'te'")
            self.layer_number = max(1, layer_number)
            self.attn_mask_type = attn_mask_type
            self.attention_type = attention_type
            if pg_collection is None:
                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
            self.pg_collection = pg_collection
            self.tp_group = pg_collection.tp   # MegatronModule.sharded_state_dict reads it
            # apply_query_key_layer_scaling divides the scale by the layer number and the local softmax
            # multiplies it back in fp32: the net scale is this one.
            self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
            self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is not None:
                raise ValueError("attention_backend 'sdpa' does not support packed sequences; use 'te'")
            if attention_bias is not None:
                raise ValueError("attention_backend 'sdpa' does not support attention_bias")
            # Like the local kernel, causality follows the layer's own mask type: megatron passes no_mask once
            # a static KV cache is filled (attention.py:511-520), where sq == 1 needs no mask anyway and a
            # longer query block still must not see its own future.
            causal = self.attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal,
                                             AttnMaskType.causal_bottom_right)
            dropout_p = self.dropout_p if self.training else 0.0

            def attend():
                return sdpa_attention(query, key, value, attention_mask, causal=causal,
                                      scale=self.softmax_scale, dropout_p=dropout_p)

            if dropout_p > 0.0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():   # as the local kernel draws its dropout
                    return attend()
            return attend()

    SDPADotProductAttention.__qualname__ = "SDPADotProductAttention"   # picklable through __getattr__ below
    return SDPADotProductAttention


@functools.lru_cache(maxsize=None)
def _te_core_attention_class():
    """TEDotProductAttention that honours an explicit mask. TE ignores ``attention_mask`` for the 'causal' and
    'no_mask' types that megatron passes (attention.py:484-520), which would let left-padded prompts attend to
    padding during generation; with a mask we ask TE for 'arbitrary' (same convention: True = masked out)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class PaddingAwareTEDotProductAttention(TEDotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if attention_mask is not None and packed_seq_params is None:
                attn_mask_type = AttnMaskType.arbitrary
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)

    PaddingAwareTEDotProductAttention.__qualname__ = "PaddingAwareTEDotProductAttention"
    return PaddingAwareTEDotProductAttention


def __getattr__(name: str):
    """``attention.SDPADotProductAttention`` (and the TE class) on first use, importing megatron-core then."""
    if name == "SDPADotProductAttention":
        return sdpa_core_attention_class()
    if name == "PaddingAwareTEDotProductAttention":
        return _te_core_attention_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
