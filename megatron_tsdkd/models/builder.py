"""HF config -> megatron-core TransformerConfig and GPTModel (local layer spec, no Apex; the core attention is
chosen by ``attention_backend``, see attention.py).

The model is built for THIS rank's pipeline stage and tensor-parallel shard, as laid out by megatron parallel_state,
or by process groups of its own (``groups``: a teacher with its own layout). Weights are random (or uninitialised
with ``perform_initialization=False``); load them with ``load_hf_weights`` or ``load_mcore_weights``; their names
are the same for every attention backend. Nothing here depends on the device: every tensor is placed on this rank's
device (runtime/placement.py) and split weights are marked tensor-parallel by ``mark_tensor_parallel_weights`` on
every path, whatever the build flags.

Activation recompute (``recompute``) maps onto TransformerConfig:
    none       nothing recomputed
    selective  recompute_granularity="selective" with megatron's default recompute_modules ["core_attn"]: the
               core attention of every layer is re-run in backward (attention.py:328-331); its [b, np, s, s]
               scores are the big saving under the local backend, little under sdpa/te, which keep no scores
    full       recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1: only each
               layer's input is kept, one layer is re-run at a time (what memory_plan.py's recompute models)
Recompute acts in training mode only (megatron skips it in eval), so a frozen teacher is unaffected.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_tsdkd.checks import require
from megatron_tsdkd.models.attention import attention_layer_spec, resolve_attention_backend
from megatron_tsdkd.models.hf_config import ArchSpec, arch_spec, check_parallel_layout
from megatron_tsdkd.runtime.placement import place_model

RECOMPUTE_MODES = ("none", "selective", "full")


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple * tp`` (each TP shard of the embedding equally sized)."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def recompute_overrides(mode: str) -> dict:
    """TransformerConfig fields for activation recompute ``mode`` (one of RECOMPUTE_MODES)."""
    require(isinstance(mode, str) and mode in RECOMPUTE_MODES, "recompute", mode,
            "must be one of " + ", ".join(RECOMPUTE_MODES))
    if mode == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return {}


def _spec(hf_config) -> ArchSpec:
    return hf_config if isinstance(hf_config, ArchSpec) else arch_spec(hf_config)


def _group_sizes(groups, spec: ArchSpec) -> tuple[int, int, int]:
    """(TP, PP, EP) of ``groups`` (a ProcessGroupCollection), or of megatron's parallel_state when None; EP is 1
    for a dense model (parallel_state's expert groups are a MoE model's beside it)."""
    if groups is not None:
        ep = getattr(groups, "ep", None)
        tp, pp, ep = groups.tp.size(), groups.pp.size(), ep.size() if ep is not None else 1
    else:
        from megatron.core import parallel_state as ps

        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        ep = ps.get_expert_model_parallel_world_size()
    return tp, pp, ep if spec.is_moe else 1


def expert_group(model):
    """The expert-parallel process group of a built GPTModel stage (its own groups' or parallel_state's) when it is
    a mixture of experts split over more than one rank, else None."""
    group = getattr(model.pg_collection, "ep", None) if model.config.num_moe_experts else None
    return group if group is not None and group.size() > 1 else None


def moe_overrides(spec: ArchSpec, ep: int, tp: int) -> dict:
    """TransformerConfig fields of a Qwen3-MoE model: HF's router (softmax over all experts, top-k, the top-k
    renormalised when norm_topk_prob; megatron's softmax over the top-k logits is that renormalisation), no
    shared expert, dropless (no capacity), megatron's sequential experts, the all-to-all dispatcher, each expert
    split over TP (megatron's default expert tensor parallelism). No load-balancing loss: a frozen teacher and an
    evaluated model need none; a trained student asks for it (``router_aux_loss_overrides``)."""
    if not spec.is_moe:
        return {}
    _without_transformer_engine_router_gemm()
    return dict(num_moe_experts=spec.num_experts, moe_router_topk=spec.moe_top_k,
                moe_ffn_hidden_size=spec.moe_ffn_hidden_size, moe_router_pre_softmax=not spec.moe_norm_topk_prob,
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall",
                moe_grouped_gemm=False, moe_expert_capacity_factor=None, moe_permute_fusion=False,
                expert_model_parallel_size=ep, expert_tensor_parallel_size=tp)


def _without_transformer_engine_router_gemm() -> None:
    """megatron-core 0.16.1's router reads ``te_general_gemm`` whenever it routes (moe_utils.py:1192), a name
    that exists only when Transformer Engine imports; without TE (this project's local spec, on any device) the
    router would raise NameError. Define it as absent, which is what the code means; a no-op with TE."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def router_aux_loss_overrides(spec: ArchSpec, coefficient: Optional[float]) -> dict:
    """A trained MoE student's load-balancing loss, as megatron-core computes and back-propagates it (aux_loss:
    the Switch-Transformer loss over each micro-batch, scaled by ``coefficient``; None: the HF config's
    router_aux_loss_coef)."""
    if not spec.is_moe:
        return {}
    coefficient = spec.router_aux_loss_coef if coefficient is None else coefficient
    return dict(moe_router_load_balancing_type="aux_loss" if coefficient > 0 else "none",
                moe_aux_loss_coeff=float(coefficient))


def transformer_config_from_hf(hf_config, *, params_dtype: torch.dtype = torch.float32, groups=None, **overrides):
    """A megatron TransformerConfig equal in numerics to the HF model; TP/PP sizes come from ``groups`` (a
    ProcessGroupCollection: a model on process groups of its own) or else parallel_state."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec = _spec(hf_config)
    tp, pp, ep = _group_sizes(groups, spec)
    check_parallel_layout(spec, tp, pp, ep=ep)
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # Need Apex / Transformer Engine, absent by design (local spec), on every device. So does the fused masked
        # softmax: megatron imports the CUDA extension scaled_masked_softmax_cuda for it (fusions/fused_softmax.py:81),
        # which megatron-core's wheel does not ship, so the local backend on a GPU would fail at its first forward.
        # The fused bias-dropout-add is torch.compile'd (megatron/core/jit.py) and recompiles per sequence length;
        # with no linear biases and no dropout in these models it would fuse a plain residual add.
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        **moe_overrides(spec, ep, tp),
    )
    kwargs.update(overrides)
    # Random weights are drawn whole on the host and split (megatron's CPU initialisation), so one seed gives the
    # same model in every TP layout (tests, benchmarks, a student trained from scratch); weights that a load will
    # overwrite (perform_initialization=False, models/source.py) are allocated straight on the device and never
    # initialised. Either way build_model then places every tensor on the device (megatron's norms are built on the
    # host in both cases) and marks the split weights itself (mark_tensor_parallel_weights).
    kwargs.setdefault("use_cpu_initialization", kwargs.get("perform_initialization", True))
    return TransformerConfig(**kwargs)


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give every tensor-parallel-split weight megatron's TP attributes (``tensor_model_parallel``,
    ``partition_dim``, ``partition_stride``), whatever the device and initialisation flags.

    megatron-core sets them on Column/RowParallelLinear and VocabParallelEmbedding weights only inside its
    initialisers (tensor_parallel/layers.py:137, :170), which run only with ``perform_initialization=True``. A
    model built to be loaded into skips them, and ``param_is_not_tensor_parallel_duplicate`` then counts each
    unmarked shard on TP rank 0 only: the gradient norm (and with it clipping and ``optim/grad_norm``) sees about
    1/TP of the split weights. Column-parallel biases are marked by megatron unconditionally; row-parallel biases
    and norms are replicated, not split. A weight megatron already marked must agree with this rule (a check that
    megatron's layout has not moved under us)."""
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                               set_tensor_model_parallel_attributes)
    from megatron.core.transformer.mlp import MLP

    # megatron's MLP splits a gated fc1 ([gate | up]) with stride 2 (transformer/mlp.py:105-115)
    strided = {id(m.linear_fc1): 2 for m in model.modules() if isinstance(m, MLP) and m.config.gated_linear_unit}
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = module.weight   # None: a first stage's output layer that reuses the embedding's weight
        if weight is None:
            continue
        want = (True, dim, strided.get(id(module), 1))
        if not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, *want)
        have = (weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride)
        if have != want:
            raise RuntimeError(f"{name}.weight: megatron marked it (tensor_model_parallel, partition_dim, "
                               f"partition_stride) = {have}, expected {want}")


def build_model(hf_config, *, params_dtype: torch.dtype = torch.float32, padded_vocab_size: Optional[int] = None,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                attention_backend: str = "auto", recompute: str = "none", groups=None, **config_overrides):
    """This rank's stage of a GPTModel laid out like ``hf_config``; vocab padded for TP unless given.
    ``attention_backend``: one of attention.ATTENTION_BACKENDS ('auto': TE if importable on GPU, else SDPA on GPU,
    else local). ``recompute``: one of RECOMPUTE_MODES. ``groups``: megatron-core's ProcessGroupCollection of a
    model laid out on process groups of its own (tp, pp, cp, embd, pos_embd, and a MoE model's expert groups;
    engines/megatron/teacher_layout.py), else parallel_state's. ``config_overrides`` (TransformerConfig fields) win."""
    backend = resolve_attention_backend(attention_backend)   # both checked before anything is imported or built
    overrides = {**recompute_overrides(recompute), **config_overrides}
    from megatron.core.models.gpt import GPTModel

    spec = _spec(hf_config)
    tp, pp, ep = _group_sizes(groups, spec)
    vocab = padded_vocab_size if padded_vocab_size is not None else _default_padded(spec.vocab_size, tp)
    check_parallel_layout(spec, tp, pp, padded_vocab=vocab, ep=ep)
    with warnings.catch_warnings():
        if backend != "te":  # megatron warns that TE's fused attention needs no core_attn recompute: not ours
            warnings.filterwarnings("ignore", message="If you are using transformer_engine")
        config = transformer_config_from_hf(spec, params_dtype=params_dtype, groups=groups, **overrides)
    layer_spec = attention_layer_spec(backend, spec)
    stage, stages = _stage(groups)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=stage == 0 if pre_process is None else pre_process,
        post_process=stage == stages - 1 if post_process is None else post_process,
        pg_collection=groups,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
        rope_scaling=spec.rope_type == "llama3",
        rope_scaling_factor=spec.rope_factor if spec.rope_type == "llama3" else 8.0,
        seq_len_interpolation_factor=spec.rope_factor if spec.rope_type == "linear" else None,
    )
    # Without Apex the local spec's norms are torch.nn.RMSNorm, built in fp32 whatever params_dtype says. Give them
    # the model's dtype, as megatron's Float16Module would: one dtype per optimizer parameter group, which
    # megatron-core's distributed optimizer needs (a group mixing fp32 norms and bf16 biases gets other parameters'
    # state mapped onto it, distrib_optimizer.py:288-296 vs :441-449), and fused norm kernels on GPU.
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.to(params_dtype)
    # Every tensor to this rank's device, whatever the flags: the norms are torch.nn.RMSNorm built on the host even
    # when megatron allocates the rest on the device, and a host-built model keeps rotary inv_freq as a plain
    # attribute that Module.to skips. Before marking: a move may replace Parameter objects (runtime/placement.py).
    place_model(model)
    mark_tensor_parallel_weights(model)
    return model


def _stage(groups) -> tuple[int, int]:
    """(this rank's pipeline stage, stages) in ``groups`` or parallel_state."""
    if groups is not None:
        return groups.pp.rank(), groups.pp.size()
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()


_default_padded = padded_vocab_size  # build_model's keyword shadows the function's name
