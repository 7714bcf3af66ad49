"""A mixture-of-experts student's load-balancing loss, as megatron-core computes it, logged as ``loss/router_aux``.

megatron-core adds the loss to the gradient itself (its routers attach it to their activations, scaled by the
schedule) and records each layer's value, before the coefficient, summed over micro-batches, in its layer-wise
tracker. After each step this reads that tracker on every rank, sums the pipeline stages' layers (one all-reduce
over the pipeline group, device tensors only: no host synchronisation), and keeps the mean over layers and
micro-batches for the step's metrics (whose reduction then averages it over data-parallel ranks). The tracker is
cleared every step, logged or not, so steps never mix.

It also lets go of the routing probabilities megatron-core's all-to-all dispatchers keep from their last forward
until the next one (token_dispatcher.py:610, ``self.probs``): they carry the step's autograd graph, whose nodes
reach the router weights' gradient hooks and through them the DDP-wrapped model. That cycle runs through autograd's
C++ nodes, which Python's collector cannot see, so a finished model (its process groups and their threads) would
otherwise outlive its run in a process that runs another (the test harness, a study).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

TRACKED = "load_balancing_loss"   # megatron-core's name for the aux_loss in its tracker (router.py)


class RouterAuxLoss:
    def __init__(self, student):
        config = student.config
        self.active = bool(config.num_moe_experts) and config.moe_router_load_balancing_type != "none"
        self.dispatchers = [m.token_dispatcher for m in student.modules() if hasattr(m, "token_dispatcher")]
        self.num_layers = config.num_layers
        self.pp_group = student.pg_collection.pp
        self.value: Optional[torch.Tensor] = None

    def collect(self, micro_batches: int) -> None:
        """After the step's backward. Collective over the pipeline group when active: the step's mean loss per
        layer and micro-batch."""
        for dispatcher in self.dispatchers:   # the step's routing probabilities, graph and all (module docstring)
            if hasattr(dispatcher, "probs"):
                dispatcher.probs = None
        if not self.active:
            return
        from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                             get_moe_layer_wise_logging_tracker)

        values = get_moe_layer_wise_logging_tracker()[TRACKED]["values"]
        total = values.float().sum()
        if self.pp_group.size() > 1:
            dist.all_reduce(total, group=self.pp_group)
        self.value = total / (self.num_layers * micro_batches)
        clear_aux_losses_tracker()

    def values(self) -> dict:
        return {"loss/router_aux": self.value} if self.value is not None else {}
