"""Vocab-parallel, chunked distillation losses: tensors in, tensors out; no model code.

Conventions: logits [batch, seq, V/TP] sharded over the tensor-parallel group ``tp_group`` (None = one device),
logits[b, t] scores the target at t, mask[b, t] != 0 marks response targets, ``vocab_size`` is the real vocabulary
size (entries at or above it are padding, -inf for both models). Results are fp32; only the student gets gradients.
"""
from megatron_tsdkd.losses.config import TSDKDLossConfig
from megatron_tsdkd.losses.cross_entropy import cross_entropy_loss, label_log_probs
from megatron_tsdkd.losses.divergences import (
    divergence_loss,
    forward_kl_loss,
    generalized_jsd_loss,
    reverse_kl_loss,
    skew_kl_loss,
    skew_reverse_kl_loss,
    token_entropy,
)
from megatron_tsdkd.losses.minillm import MiniLLMLossOutput, minillm_loss
from megatron_tsdkd.losses.plackett_luce import plackett_luce_nll
from megatron_tsdkd.losses.token_statistics import Divergence, TokenStatistics, token_statistics
from megatron_tsdkd.losses.tsdkd import TSDKDLossOutput, tsdkd_loss
from megatron_tsdkd.losses.vocab_parallel import (
    VocabShard,
    gather_global_ids,
    log_normalizer,
    mask_padded_vocab,
    topk_global,
)

__all__ = [
    "TSDKDLossConfig", "TSDKDLossOutput", "tsdkd_loss", "generalized_jsd_loss", "forward_kl_loss", "reverse_kl_loss",
    "skew_kl_loss", "skew_reverse_kl_loss", "cross_entropy_loss", "label_log_probs", "divergence_loss", "token_entropy",
    "plackett_luce_nll", "Divergence", "TokenStatistics", "token_statistics", "VocabShard", "gather_global_ids",
    "log_normalizer", "mask_padded_vocab", "topk_global", "minillm_loss", "MiniLLMLossOutput",
]
