"""One forward pass of new tokens through this rank's pipeline stage, with the hidden state handed on by p2p.

Generation cannot use megatron's training schedules (they expect fixed shapes and a loss); per step every
stage receives the previous stage's hidden state [s, b, h], runs its layers (extending its own KV cache when
an inference context is given) and sends the result on. Only the last stage gets logits: the last position's,
gathered over TP to the full padded vocabulary [b, V_padded] (megatron's inference contract, see
token_selection.py). Plain ``torch.distributed`` send/recv over megatron's pipeline group; written by hand.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist


def pipeline_dtype(model) -> torch.dtype:
    config = model.config
    return config.pipeline_dtype or config.params_dtype


@contextlib.contextmanager
def padding_aware_attention(model):
    """Eval mode, and megatron's fused causal softmax kernel switched off: that kernel (fp16/bf16 on GPU) builds
    its own causal mask and ignores the padding mask that left-padded prompts need. Restored on exit."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    if model.config.sequence_parallel:
        raise ValueError("generation needs a model built with sequence_parallel=False (one new token per step "
                         "cannot be split across tensor-parallel ranks)")
    softmaxes = [m for m in model.modules() if isinstance(m, FusedScaleMaskSoftmax)]
    fused = [m.scaled_masked_softmax_fusion for m in softmaxes]
    was_training = model.training
    model.eval()
    for m in softmaxes:
        m.scaled_masked_softmax_fusion = False
    try:
        yield
    finally:
        for m, flag in zip(softmaxes, fused):
            m.scaled_masked_softmax_fusion = flag
        model.train(was_training)


def stage_forward(model, tokens: torch.Tensor, attention_mask: torch.Tensor,
                  inference_context=None) -> Optional[torch.Tensor]:
    """Run ``tokens`` [b, s] (the new positions) through this stage. ``attention_mask`` [b, 1, s, sk] is True
    where attention is forbidden. Returns the last position's logits [b, V_padded] on the last
    stage, None on the others. Advances ``inference_context`` by s positions."""
    from megatron.core import parallel_state as ps

    batch, seq = tokens.shape
    pp_group = ps.get_pipeline_model_parallel_group()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    dtype = pipeline_dtype(model)
    if not first:
        hidden = torch.empty(seq, batch, model.config.hidden_size, dtype=dtype, device=tokens.device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank(), group=pp_group)
        model.set_input_tensor(hidden)
    position_ids = torch.arange(seq, device=tokens.device).expand(batch, seq)  # unused by rope: see generate.py
    output = model(tokens, position_ids, attention_mask, inference_context=inference_context,
                   runtime_gather_output=True)
    if inference_context is not None:
        inference_context.increment_sequence_len_offset(seq)
    if not last:
        dist.send(output.to(dtype).contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(), group=pp_group)
        return None
    return output[:, -1, :]
