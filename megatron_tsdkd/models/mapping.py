"""The ONE place that says how Hugging Face tensors become megatron-core tensors, per TP rank and pipeline stage.

A megatron parameter shard on TP rank r is the concatenation, along ``cat_axis``, of ``pieces``: slices of HF
tensors (a slice along one axis each), followed by zero rows up to ``shard_shape`` (padded vocabulary). This one
description serves both directions: the loader reads exactly the pieces (safetensors slices, never whole tensors
it does not need), the exporter cuts gathered shards back into pieces, and the tests compare against it.

Layouts encoded here (megatron-core's local GPT spec):
- linear_qkv: per query group g of this rank, [q heads of g | k head g | v head g] along rows (bias alike);
- linear_fc1 (SwiGLU): [gate rows of this rank | up rows of this rank];
- mixture of experts (qwen3_moe): mlp.router is HF's mlp.gate (replicated); local expert j of expert-parallel rank
  e is HF expert e * (experts / EP) + j, its linear_fc1 / linear_fc2 split over TP like a dense MLP's
  (megatron-core's SequentialMLP, expert tensor parallelism = TP);
- linear_proj / linear_fc2: split along columns (input dim); embedding / output layer: rows of the padded
  vocabulary; norms (incl. Qwen3's q/k norm): replicated;
- tied embeddings: the last stage's output_layer (only when it is not also the first stage) is a copy of
  model.embed_tokens.weight and is not exported again.
No installable library provides this mapping for megatron-core 0.16 (megatron-bridge needs Transformer Engine and
Python >= 3.12), so it is written by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from megatron_tsdkd.models.builder import expert_group
from megatron_tsdkd.models.hf_config import ArchSpec

EMBEDDING, OUTPUT = "model.embed_tokens.weight", "lm_head.weight"
VOCABULARY_TENSORS = (EMBEDDING, OUTPUT)   # the HF tensors with one row per vocabulary entry


@dataclass(frozen=True)
class Piece:
    """``hf_name[start:stop]`` along ``axis`` of the HF tensor."""

    hf_name: str
    axis: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def index(self) -> tuple:
        return (slice(None),) * self.axis + (slice(self.start, self.stop),)


@dataclass(frozen=True)
class ShardLayout:
    mcore_name: str                  # name in this stage's ``model.state_dict()`` (local layer index)
    pieces: tuple[Piece, ...]
    cat_axis: int
    shard_shape: tuple[int, ...]
    tp_split: bool                   # False: replicated over TP ranks
    export: bool = True              # False for the tied output layer copy of the embedding
    expert: bool = False             # an expert's weight: each expert-parallel rank holds different experts

    def assemble(self, read: Callable[[Piece], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The megatron shard built from HF slices returned by ``read``; padding rows are zero."""
        parts = [read(p).to(dtype) for p in self.pieces]
        filled = sum(p.length for p in self.pieces)
        missing = self.shard_shape[self.cat_axis] - filled
        if missing:
            pad_shape = list(self.shard_shape)
            pad_shape[self.cat_axis] = missing
            parts.append(torch.zeros(pad_shape, dtype=dtype))
        return torch.cat(parts, dim=self.cat_axis) if len(parts) > 1 else parts[0].contiguous()

    def scatter(self, shard: torch.Tensor, hf_tensors: dict[str, torch.Tensor]) -> None:
        """Write the pieces of a megatron ``shard`` back into full HF tensors (padding is dropped)."""
        offset = 0
        for p in self.pieces:
            hf_tensors[p.hf_name][p.index()] = shard.narrow(self.cat_axis, offset, p.length)
            offset += p.length


def hf_tensor_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this architecture holds, with its full shape."""
    h, hd, ffn = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    q, kv = spec.num_heads * hd, spec.num_query_groups * hd
    shapes = {EMBEDDING: (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        shapes[OUTPUT] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
        })
        if spec.is_moe:
            shapes[p + "mlp.gate.weight"] = (spec.num_experts, h)
            for e in range(spec.num_experts):
                shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", spec.moe_ffn_hidden_size, h))
        else:
            shapes.update(_mlp_shapes(p + "mlp.", ffn, h))
        if spec.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def _mlp_shapes(prefix: str, ffn: int, h: int) -> dict[str, tuple[int, int]]:
    return {prefix + "gate_proj.weight": (ffn, h), prefix + "up_proj.weight": (ffn, h),
            prefix + "down_proj.weight": (h, ffn)}


def _replicated(mcore_name: str, hf_name: str, shape: tuple[int, ...]) -> ShardLayout:
    return ShardLayout(mcore_name, (Piece(hf_name, 0, 0, shape[0]),), 0, shape, tp_split=False)


def _split(mcore_name: str, hf_name: str, shape: tuple[int, ...], axis: int, tp_rank: int, tp: int) -> ShardLayout:
    size = shape[axis] // tp
    shard = list(shape)
    shard[axis] = size
    return ShardLayout(mcore_name, (Piece(hf_name, axis, tp_rank * size, (tp_rank + 1) * size),), axis, tuple(shard),
                       tp_split=True)


def _vocab_rows(mcore_name: str, hf_name: str, spec: ArchSpec, padded_vocab: int, tp_rank: int, tp: int,
                export: bool = True) -> ShardLayout:
    rows = padded_vocab // tp
    start, stop = tp_rank * rows, min((tp_rank + 1) * rows, spec.vocab_size)
    pieces = (Piece(hf_name, 0, start, stop),) if stop > start else ()
    return ShardLayout(mcore_name, pieces, 0, (rows, spec.hidden_size), tp_split=True, export=export)


def _qkv(mcore_name: str, hf_prefix: str, suffix: str, spec: ArchSpec, tp_rank: int, tp: int) -> ShardLayout:
    hd, per_group = spec.head_dim, spec.heads_per_group
    groups = spec.num_query_groups // tp
    pieces = []
    for g in range(tp_rank * groups, (tp_rank + 1) * groups):
        pieces.append(Piece(f"{hf_prefix}q_proj.{suffix}", 0, g * per_group * hd, (g + 1) * per_group * hd))
        pieces.append(Piece(f"{hf_prefix}k_proj.{suffix}", 0, g * hd, (g + 1) * hd))
        pieces.append(Piece(f"{hf_prefix}v_proj.{suffix}", 0, g * hd, (g + 1) * hd))
    rows = groups * (per_group + 2) * hd
    shape = (rows, spec.hidden_size) if suffix == "weight" else (rows,)
    return ShardLayout(mcore_name, tuple(pieces), 0, shape, tp_split=True)


def _mlp(mcore_prefix: str, hf_prefix: str, ffn: int, h: int, tp_rank: int, tp: int,
         expert: bool = False) -> list[ShardLayout]:
    """A SwiGLU MLP's linear_fc1 ([gate rows of this rank | up rows of this rank]) and linear_fc2 (columns)."""
    rows = ffn // tp
    start, stop = tp_rank * rows, (tp_rank + 1) * rows
    pieces = (Piece(hf_prefix + "gate_proj.weight", 0, start, stop),
              Piece(hf_prefix + "up_proj.weight", 0, start, stop))
    fc2 = _split(mcore_prefix + "linear_fc2.weight", hf_prefix + "down_proj.weight", (h, ffn), 1, tp_rank, tp)
    return [ShardLayout(mcore_prefix + "linear_fc1.weight", pieces, 0, (2 * rows, h), tp_split=True, expert=expert),
            replace(fc2, expert=expert)]


def _moe(mcore_prefix: str, hf_prefix: str, spec: ArchSpec, tp_rank: int, tp: int, ep_rank: int,
         ep: int) -> list[ShardLayout]:
    """A MoE layer: the router (HF's gate), then this expert-parallel rank's experts."""
    out = [_replicated(mcore_prefix + "router.weight", hf_prefix + "gate.weight", (spec.num_experts, spec.hidden_size))]
    local = spec.num_experts // ep
    for j in range(local):
        out += _mlp(f"{mcore_prefix}experts.local_experts.{j}.", f"{hf_prefix}experts.{ep_rank * local + j}.",
                    spec.moe_ffn_hidden_size, spec.hidden_size, tp_rank, tp, expert=True)
    return out


def stage_layouts(spec: ArchSpec, *, tp_rank: int, tp: int, layer_numbers: Sequence[int], pre_process: bool,
                  post_process: bool, padded_vocab: int, has_output_weight: bool, ep_rank: int = 0,
                  ep: int = 1) -> list[ShardLayout]:
    """Layouts of every parameter of one pipeline stage on one TP rank (and expert-parallel rank: its experts).

    ``layer_numbers``: the global 0-based HF layer index of each local megatron layer, in order.
    ``has_output_weight``: whether the stage's output_layer owns a weight (False when tied on the first stage).
    """
    h, hd, ffn = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    shapes = hf_tensor_shapes(spec)
    out: list[ShardLayout] = []
    if pre_process:
        out.append(_vocab_rows("embedding.word_embeddings.weight", EMBEDDING, spec, padded_vocab, tp_rank, tp))
    for local, i in enumerate(layer_numbers):
        m, p = f"decoder.layers.{local}.", f"model.layers.{i}."
        out.append(_replicated(m + "input_layernorm.weight", p + "input_layernorm.weight", (h,)))
        out.append(_qkv(m + "self_attention.linear_qkv.weight", p + "self_attn.", "weight", spec, tp_rank, tp))
        if spec.qkv_bias:
            out.append(_qkv(m + "self_attention.linear_qkv.bias", p + "self_attn.", "bias", spec, tp_rank, tp))
        if spec.qk_norm:
            out.append(_replicated(m + "self_attention.q_layernorm.weight", p + "self_attn.q_norm.weight", (hd,)))
            out.append(_replicated(m + "self_attention.k_layernorm.weight", p + "self_attn.k_norm.weight", (hd,)))
        out.append(_split(m + "self_attention.linear_proj.weight", p + "self_attn.o_proj.weight",
                          shapes[p + "self_attn.o_proj.weight"], 1, tp_rank, tp))
        out.append(_replicated(m + "pre_mlp_layernorm.weight", p + "post_attention_layernorm.weight", (h,)))
        if spec.is_moe:
            out += _moe(m + "mlp.", p + "mlp.", spec, tp_rank, tp, ep_rank, ep)
        else:
            out += _mlp(m + "mlp.", p + "mlp.", ffn, h, tp_rank, tp)
    if post_process:
        out.append(_replicated("decoder.final_layernorm.weight", "model.norm.weight", (h,)))
        if has_output_weight:
            tied = spec.tie_embeddings
            out.append(_vocab_rows("output_layer.weight", EMBEDDING if tied else OUTPUT, spec, padded_vocab, tp_rank,
                                   tp, export=not tied))
    return out


def model_layouts(model, spec: ArchSpec, tp_rank: int | None = None, ep_rank: int | None = None) -> list[ShardLayout]:
    """``stage_layouts`` for a built GPTModel stage, on this rank (or on ``tp_rank`` of its TP group, ``ep_rank``
    of its expert-parallel group): the model's own groups (parallel_state's unless it was built on groups of its
    own)."""
    tp_group, ep_group = model.pg_collection.tp, expert_group(model)
    return stage_layouts(
        spec,
        ep_rank=(ep_group.rank() if ep_group is not None else 0) if ep_rank is None else ep_rank,
        ep=ep_group.size() if ep_group is not None else 1,
        tp_rank=tp_group.rank() if tp_rank is None else tp_rank,
        tp=tp_group.size(),
        layer_numbers=[layer.layer_number - 1 for layer in model.decoder.layers],
        pre_process=model.pre_process,
        post_process=model.post_process,
        padded_vocab=model.vocab_size,
        has_output_weight=model.post_process and model.output_layer.weight is not None,
    )
