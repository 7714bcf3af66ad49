"""How far the rollout engine's log-probabilities of the tokens it sampled are from the trainer's own: the sums
behind ``rollout/logprob_diff`` and ``rollout/kl`` (engines/rollout_guard.py).

Both sides score the same token under the student's distribution at temperature 1 over the real vocabulary: the
engine when it sampled it (generation: ``GenerationOutput.logprobs``), the trainer in its forward (the label's
log-probability from the vocab-sharded logits, ``cross_entropy.label_log_probs``: no rank gathers the vocabulary).
With d = log p_train - log p_rollout per response token: the mean |d| says how far apart they are (~1e-6 in fp32
for a decode that runs the trained weights; several nats for a replica holding other weights), and
exp(d) - 1 - d (the "k3" estimator, never negative) estimates KL(rollout || train) when the tokens were drawn at
temperature 1 (an approximation under other sampling settings).
"""
from __future__ import annotations

import torch

from megatron_tsdkd.losses.cross_entropy import label_log_probs
from megatron_tsdkd.losses.inputs import Targets, positions_of


@torch.no_grad()
def rollout_drift(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  rollout_logprobs: torch.Tensor, tp_group=None, vocab_size=None,
                  chunk_size: int = 1024, targets: Targets | None = None) -> torch.Tensor:
    """[sum |d|, sum (exp(d) - 1 - d), number of targets] over the response targets (mask != 0), fp32, on the
    logits' device; ``rollout_logprobs`` [batch, seq] holds the engine's value at each target. ``targets``: the
    batch's host-side ``Targets`` (losses/inputs.py); None reads them off ``mask``."""
    trained, _ = label_log_probs(student_logits, labels, mask, tp_group, vocab_size, chunk_size, targets)
    sampled = rollout_logprobs.reshape(-1).index_select(0, positions_of(mask, targets)).to(trained.dtype)
    d = trained - sampled
    return torch.stack([d.abs().sum(), (d.exp() - 1.0 - d).sum(), d.new_tensor(float(d.numel()))]).float()
