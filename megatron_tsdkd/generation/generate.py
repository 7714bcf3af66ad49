"""KV-cached autoregressive generation for a megatron-core GPTModel split over tensor and pipeline parallelism.

Call it on every rank of one model-parallel group with the same prompts. Per step the stages run the new
column of tokens (stage_forward.py), the last stage picks the next ids (token_selection.py) and broadcasts them
over the pipeline group, so every rank holds the same tokens and knows which rows have stopped.

The KV cache is megatron-core's own ``StaticInferenceContext`` (inference/contexts/static_context.py): each
attention layer keeps [T, b, groups, head_dim] key/value buffers and appends the new positions at
``sequence_len_offset``. It works unchanged on CPU; left padding (padded_batch.py) supplies what it lacks,
per-row prompt lengths. ``use_kv_cache=False`` re-runs the whole sequence each step instead (with a fresh
context, so that only the last position's logits are computed, as in the cached run): the reference the tests
and the benchmark compare against. ``decode`` is the loop itself, shared with co_generation.py, whose tokens are
picked from the student's and the teacher's logits together.

A mixture-of-experts model split over expert parallelism exchanges tokens with the other replicas of its EP group
in every forward, so those replicas (each decoding its own prompts) must run the same number of steps: their stop
check agrees over the EP group (all of them done), a finished replica decoding padding until then.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_tsdkd.generation.padded_batch import PaddedBatch
from megatron_tsdkd.generation.sampling_config import SamplingConfig
from megatron_tsdkd.generation.stage_forward import padding_aware_attention, stage_forward
from megatron_tsdkd.generation.token_selection import log_probs_of, select_tokens


@dataclass
class GenerationOutput:
    responses: list[list[int]]   # row i = prompt i // num_samples, sample i % num_samples; EOS kept when produced
    prompt_index: list[int]      # the prompt each response answers
    finished: list[bool]         # True where the row ended with an EOS token, False where max_new_tokens cut it
    # per response token: its log-probability under the sampling model (the student) at temperature 1 over the real
    # vocabulary, whatever the sampling settings: what the trainer's forward gives the same token (the rollout
    # guard compares them, engines/rollout_guard.py). Our decode has them on the last pipeline stage only (where
    # the losses run; None on the others); a vLLM replica on every rank.
    logprobs: Optional[list[list[float]]] = None


def _broadcast_new_tokens(new: torch.Tensor, sampled: bool) -> torch.Tensor:
    """The last stage's ids to every rank of the model-parallel group (in place). ``new`` lives on the model's
    device (select_tokens keeps the logits' device; other stages allocate there), which is what NCCL needs."""
    from megatron.core import parallel_state as ps

    if sampled and ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_world_size() > 1:
        # Every TP rank drew from the same logits and generator; make the first rank's draw the law anyway.
        dist.broadcast(new, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(new, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return new


@torch.no_grad()
def generate(model, prompts: list[list[int]], config: SamplingConfig, *, eos_token_ids: Iterable[int],
             pad_token_id: int, vocab_size: int, generator_seed: int = 0,
             use_kv_cache: bool = True) -> GenerationOutput:
    """Responses for ``prompts`` (token ids), ``config.num_samples`` per prompt, identical on every rank of
    the model-parallel group. ``vocab_size`` is the real vocabulary: ids at or above it (TP padding) are never
    produced. Deterministic given ``generator_seed``; give each data-parallel replica its own seed. The draws
    of one step are made for the whole batch at once, so a row's sample also depends on the batch it is in."""
    device = _device(model)
    generator = torch.Generator(device=device).manual_seed(int(generator_seed))
    decoded = decode([model], prompts, config, lambda logits, done: select_tokens(logits[0], config, vocab_size,
                                                                                 generator),
                     eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, vocab_size=vocab_size,
                     use_kv_cache=use_kv_cache)
    return GenerationOutput(**output_fields(*decoded, config))


def _device(model) -> torch.device:
    from megatron.core.utils import unwrap_model

    return next(unwrap_model(model).parameters()).device


def _all_done(done: torch.Tensor, stop_group) -> bool:
    """Whether every row has stopped, here and (``stop_group``) on every replica of the EP group: the host sync."""
    finished = done.all()
    if stop_group is not None:
        finished = finished.to(torch.int32)
        dist.all_reduce(finished, op=dist.ReduceOp.MIN, group=stop_group)
    return bool(finished)


def decode(models, prompts: list[list[int]], config: SamplingConfig, pick, *, eos_token_ids: Iterable[int],
           pad_token_id: int, vocab_size: int,
           use_kv_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The decoding loop every generator shares: the models (co-located, each with its own KV cache) run the new
    column stage by stage; on the last pipeline stage ``pick(logits, done)`` turns their next-token logits (one
    [b, V] tensor per model) into ids [b]; the ids reach every rank; a row stops at its EOS. Returns the
    generated columns [b, max_new_tokens], each row's response length, whether it ended with an EOS, and on the
    last stage (None elsewhere) each new token's log-probability under the first model at temperature 1 over the
    real vocabulary (``vocab_size`` ids). Nothing in a step reads a device value back to the host, except the
    stop check every ``config.stop_check_interval`` tokens."""
    from contextlib import ExitStack

    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.utils import unwrap_model

    from megatron_tsdkd.models.builder import expert_group

    models = [unwrap_model(m) for m in models]  # generation feeds token ids and hidden states to the GPTModel itself
    device = next(models[0].parameters()).device
    # the replicas of a MoE model's expert-parallel group stop together (module docstring)
    stop_group = next((g for g in map(expert_group, models) if g is not None), None)
    rows = [list(p) for p in prompts for _ in range(config.num_samples)]
    batch = PaddedBatch.from_prompts(rows, config.max_new_tokens, pad_token_id, device)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    total = batch.tokens.shape[1]
    contexts = [StaticInferenceContext(len(rows), total) for _ in models]
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    lengths = torch.full((len(rows),), config.max_new_tokens, dtype=torch.long, device=device)
    logprobs = None

    with ExitStack() as stack:
        for model in models:
            stack.enter_context(padding_aware_attention(model))
        for step in range(config.max_new_tokens):
            known = batch.prompt_len + step  # tokens so far; the new one goes to column `known`
            if use_kv_cache:
                start = 0 if step == 0 else known - 1
                if step == 1:
                    for context in contexts:
                        context.enable_decode_mode()
            else:  # a fresh cache each step: the whole sequence is recomputed, only the last logits are made
                start, contexts = 0, [StaticInferenceContext(len(rows), total) for _ in models]
            mask = batch.attention_mask(start, known)
            logits = [stage_forward(m, batch.tokens[:, start:known], mask, c) for m, c in zip(models, contexts)]
            if logits[0] is not None:
                new = pick(logits, done)
            else:
                new = torch.empty(len(rows), dtype=torch.long, device=device)
            new = _broadcast_new_tokens(new, sampled=not config.greedy)
            if logits[0] is not None:   # the last stage: the draw every rank now holds, scored by the first model
                if logprobs is None:
                    logprobs = torch.zeros(len(rows), config.max_new_tokens, dtype=torch.float32, device=device)
                logprobs[:, step] = log_probs_of(logits[0][:, :vocab_size], new)
            new = torch.where(done, torch.full_like(new, pad_token_id), new)
            batch.tokens[:, known] = new
            stops = ~done & torch.isin(new, eos)
            lengths = torch.where(stops, step + 1, lengths)   # not lengths[stops] = ...: a mask index syncs
            done |= stops
            # The loop's one host sync, every stop_check_interval tokens; every rank holds the same `done`, so all
            # stop together. Finished rows meanwhile get padding and keep their length: same outputs.
            if (step + 1) % config.stop_check_interval == 0 and _all_done(done, stop_group):
                break
    return batch.tokens[:, batch.prompt_len:], lengths, done, logprobs


def output_fields(tokens: torch.Tensor, lengths: torch.Tensor, done: torch.Tensor, logprobs: Optional[torch.Tensor],
                  config: SamplingConfig) -> dict:
    """GenerationOutput's fields from ``decode``'s tensors (the host copy the caller needs anyway)."""
    generated, lengths_list = tokens.tolist(), lengths.tolist()
    scores = logprobs.tolist() if logprobs is not None else None
    return dict(responses=[generated[i][:lengths_list[i]] for i in range(len(generated))],
                prompt_index=[i // config.num_samples for i in range(len(generated))], finished=done.tolist(),
                logprobs=None if scores is None else [scores[i][:n] for i, n in enumerate(lengths_list)])
