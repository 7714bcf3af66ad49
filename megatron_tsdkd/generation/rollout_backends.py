"""Rollout backends behind one call: ``generate(prompts, config, generator_seed) -> (GenerationOutput, seconds of
weight sync)``, plus ``weights_changed()`` after every applied optimizer step and ``close()`` at the end of the job.
``syncs_weights`` says whether it holds a copy of the weights to sync. The run plan (planning/run_plan.py) picks one
per run; an engine builds it from its models; the training step
(engines/trainer.py) only ever calls these three methods.

- ``MegatronDecode``: our KV-cached decode of the student at the training TP x PP (generate.py);
- ``CoGeneration``: student and teacher pick each token together (co_generation.py: SKD, MiniLLM);
- ``VllmRollouts`` (vllm_rollouts.py): a colocated vLLM replica per rank, synced after each step;
- ``HfGenerate``: transformers' ``generate`` on the DeepSpeed engine's student (HF KV cache; under ZeRO-3 with
  ``synced_gpus`` every rank decodes until the longest row is done), stops trimmed by data/collate.py's one rule.
Every backend returns each sampled token's log-probability under the student at temperature 1 over the real
vocabulary (GenerationOutput.logprobs), which the rollout guard compares with the trainer's (engines/rollout_guard.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_tsdkd.data.collate import collate_prompts, trim_generation
from megatron_tsdkd.generation.co_generation import CoSampling, co_generate
from megatron_tsdkd.generation.generate import GenerationOutput, generate
from megatron_tsdkd.generation.sampling_config import SamplingConfig
from megatron_tsdkd.generation.token_selection import log_probs_of
from megatron_tsdkd.models.token_spec import TokenSpec


class _Local:
    """A backend that samples with the trained weights themselves: nothing to sync, nothing to close."""

    syncs_weights = False   # (VllmRollouts: True; its seconds of weight sync are logged as time/weight_sync)

    def weights_changed(self) -> None:
        pass

    def close(self) -> None:
        pass


class MegatronDecode(_Local):
    """The student's own KV-cached sampling at the training layout (collective over its model-parallel group)."""

    def __init__(self, student, tokens: TokenSpec):
        self.student, self.tokens = student, tokens

    def generate(self, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                 generator_seed: int) -> tuple[GenerationOutput, float]:
        t = self.tokens
        return generate(self.student, list(prompts), config, eos_token_ids=t.stop_ids, pad_token_id=t.pad_id,
                        vocab_size=t.vocab_size, generator_seed=generator_seed), 0.0


class CoGeneration(_Local):
    """Student and co-located teacher choose each token by ``rule`` (a co-generation method's CoSampling)."""

    def __init__(self, student, teacher, rule: CoSampling, tokens: TokenSpec):
        self.student, self.teacher, self.rule, self.tokens = student, teacher, rule, tokens

    def generate(self, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                 generator_seed: int) -> tuple[GenerationOutput, float]:
        t = self.tokens
        return co_generate(self.student, self.teacher, list(prompts), config, self.rule, eos_token_ids=t.stop_ids,
                           pad_token_id=t.pad_id, vocab_size=t.vocab_size, generator_seed=generator_seed), 0.0


class HfGenerate(_Local):
    """transformers' ``generate`` on a Hugging Face causal LM (the DeepSpeed engine's student, possibly a ZeRO-3
    engine's module: ``synced_gpus`` keeps every rank decoding until all are done, each step gathering the
    weights). Ids beyond the real vocabulary are never sampled."""

    def __init__(self, model, tokens: TokenSpec, device: torch.device, synced_gpus: bool):
        self.model, self.tokens, self.device, self.synced_gpus = model, tokens, device, synced_gpus

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                 generator_seed: int) -> tuple[GenerationOutput, float]:
        from transformers import LogitsProcessor, LogitsProcessorList

        t = self.tokens
        vocab = t.vocab_size

        class RealVocabulary(LogitsProcessor):   # rows beyond the tokenizer are never sampled
            def __call__(self, input_ids, scores):
                scores[:, vocab:] = -float("inf")
                return scores

        n = config.num_samples   # each prompt repeated: greedy generate takes no num_return_sequences > 1
        batch = collate_prompts([list(p) for p in prompts for _ in range(n)], t.pad_id, padding_side="left")
        torch.manual_seed(generator_seed)
        sampling = {} if config.greedy else {"temperature": config.temperature, "top_p": config.top_p,
                                             "top_k": config.top_k or None}
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=batch.input_ids.to(self.device), attention_mask=batch.attention_mask.to(self.device),
            max_new_tokens=config.max_new_tokens, do_sample=not config.greedy, eos_token_id=list(t.stop_ids),
            pad_token_id=t.pad_id,
            logits_processor=LogitsProcessorList([RealVocabulary()]), synced_gpus=self.synced_gpus,
            output_logits=True, return_dict_in_generate=True, **sampling)
        self.model.train(was_training)
        new = out.sequences[:, batch.input_ids.shape[1]:]
        # each token's log-probability at temperature 1 over the real vocabulary, from the raw logits
        scores = torch.stack([log_probs_of(step[:, :vocab], new[:, j]) for j, step in enumerate(out.logits)], 1)
        responses = [trim_generation(row, t.stop_ids, t.pad_id) for row in new.tolist()]
        stops = set(t.stop_ids)
        return GenerationOutput(responses=responses, prompt_index=[i // n for i in range(len(responses))],
                                finished=[bool(r) and r[-1] in stops for r in responses],
                                logprobs=[s[:len(r)] for s, r in zip(scores.tolist(), responses)]), 0.0
