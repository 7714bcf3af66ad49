"""Term balance (``method.balance: shares``, beyond the paper): weights that give each TSD-KD term its target share
of the logit-gradient norm.

With g_k the gradient on the student logits of the weighted term k (L_direct, gamma_em * L_em, alpha * L_indirect;
losses/term_gradients.py, reduced over the TP group) and n_k = ||g_k||, the weights

    lambda_k = s_k * sum_j n_j / n_k        (s_k the target shares of the switched-on terms, renormalised to sum 1)

make the loss sum_k lambda_k * term_k, whose term k has the gradient norm lambda_k n_k = s_k * sum_j n_j: share s_k
exactly, with the sum of the three norms unchanged (the balance redistributes, it does not rescale the update, so
clipping and the learning rate keep their meaning). When the targets equal the measured shares every lambda is 1
and the loss is the unbalanced one. gamma_em and alpha no longer matter: lambda absorbs any fixed scale.

When: every micro-batch measures its n (one extra backward of the loss head per term, on the vocab shards), BEFORE
its loss is formed, so the weights of a micro-batch include its own measurement; no lag. The norms are averaged
over the data-parallel group (one all-reduce of three numbers per micro-batch, on the device, no host sync), so
every rank applies the same weights, and smoothed with a bias-corrected EMA (``decay``) so one noisy micro-batch
cannot swing the loss. The weights are constants for autograd (detached): the step's gradient is the gradient of
a sum of micro-batch losses with fixed weights. Why not the weights of step s from the norms of steps < s, or
from step s's first micro-batch: the loss is formed per micro-batch inside megatron's schedule (forward, then at
once its backward), so step-level weights would have to exist before any of step s's norms; a lag only adds
staleness, and waiting for the first micro-batch adds nothing over using each micro-batch's own norms, which
exist before its loss does (measured on the graph the loss is built from). State (the EMA and its update count) is
this object's, saved in the trainer's checkpoint through the method's ``state_dict``: a resumed run applies the
same weights.

Written by hand: no library balances loss terms by gradient-norm shares on vocab-sharded logits (GradNorm-style
methods learn weights by an extra optimisation; this is a closed form on measured norms).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_tsdkd.runtime.collectives import all_reduce_values


class TermBalance:
    """EMA of the three terms' logit-gradient norms and the weights that turn them into the target shares."""

    def __init__(self, targets: Sequence[float], active: Sequence[bool], decay: float):
        shares = torch.tensor([t if a else 0.0 for t, a in zip(targets, active)], dtype=torch.float64)
        if shares.sum() <= 0:
            raise ValueError("target_shares: the switched-on terms all have a target share of 0")
        self.targets = shares / shares.sum()
        self.active = torch.tensor(list(active))
        self.decay = float(decay)
        self.average: Optional[torch.Tensor] = None   # EMA of the norms (biased towards 0 until corrected)
        self.updates = 0

    def update(self, norms: torch.Tensor, group=None) -> torch.Tensor:
        """Record one micro-batch's norms [3] (averaged over ``group``, the data-parallel group; None: the default
        group when torch.distributed runs, else this process alone) and return the weights [3] to apply."""
        norms = norms.detach().to(torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1:
            norms = all_reduce_values(norms, group=group).to(norms.device) / dist.get_world_size(group=group)
        if self.average is None:
            self.average = torch.zeros(3, dtype=torch.float64, device=norms.device)
        self.average = self.average.to(norms.device)   # a no-op but after a resume (loaded on the CPU)
        self.average.mul_(self.decay).add_(norms, alpha=1.0 - self.decay)
        self.updates += 1
        return self.weights()

    def smoothed_norms(self) -> torch.Tensor:
        """The bias-corrected EMA of the norms (zeros before the first update)."""
        if self.average is None:
            return torch.zeros(3, dtype=torch.float64)
        return self.average / (1.0 - self.decay ** self.updates)

    def weights(self) -> torch.Tensor:
        """lambda [3] (fp64, detached); 1 for a term that has had no gradient yet or is switched off."""
        if self.average is None:
            return torch.ones(3, dtype=torch.float64)
        norms = self.smoothed_norms()
        active = self.active.to(norms.device)
        targets = self.targets.to(norms.device)
        total = torch.where(active, norms, 0.0).sum()
        usable = active & (norms > 0)
        return torch.where(usable, targets * total / torch.where(usable, norms, 1.0), 1.0)

    def state_dict(self) -> dict:
        """Plain numbers (a host read, at checkpoint time only)."""
        return {"average": None if self.average is None else self.average.tolist(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        average = state.get("average")
        self.average = None if average is None else torch.tensor(average, dtype=torch.float64)
        self.updates = int(state.get("updates", 0))
