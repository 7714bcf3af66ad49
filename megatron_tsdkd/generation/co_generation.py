"""Co-generation: student and teacher decode together, each with its own KV cache, and each new token is chosen
from both models' next-token logits. The rollouts of Speculative KD and of MiniLLM's teacher-mixed sampling.

Per step, every pipeline stage runs the new column through the student's stage and then the teacher's (both are
co-located on the same ranks, engines/megatron/colocation.py, so the p2p sends pair up in the same order on every stage);
the last stage holds both models' next-token logits and picks the token with the rule; the ids are broadcast as in
generate.py, so every rank holds the same responses.

Rules (z_S, z_T: the two models' logits at the step, real vocabulary only):
- ``speculative`` (SKD, Xu et al., ICLR 2025): the student proposes y ~ sample(z_S) exactly as plain generation
  draws it (same generator, same stream); the teacher keeps y when it is within its top-K, i.e.
  z_T[y] >= (K-th largest z_T), and otherwise replaces it by its own draw from its top-K (the tokens it would have
  accepted; a second, independent generator). K = vocabulary: the student's samples unchanged; K = 1: the
  teacher's greedy decoding.
- ``mixture`` (MiniLLM, Gu et al., ICLR 2024): y ~ p~ = a softmax(z_T / tau) + (1 - a) softmax(z_S / tau), each
  model's distribution filtered by the rollout's top-k / top-p first; a = 0 is plain student sampling.
Greedy rollouts take the proposal's argmax (speculative) or the mixture's argmax.

Vocab-parallel: megatron-core's GPTModel gathers the inference logits over TP (token_selection.py), so each rank
already holds the full row; the top-K test reads the K-th largest value and the proposal's teacher logit with the
loss library's topk_global / gather_global_ids and needs no sort and no further collective.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import torch

from megatron_tsdkd.checks import require
from megatron_tsdkd.generation.generate import GenerationOutput, _device, decode, output_fields
from megatron_tsdkd.generation.sampling_config import SamplingConfig
from megatron_tsdkd.generation.token_selection import draw, filter_top_k_top_p, select_tokens
from megatron_tsdkd.losses.vocab_parallel import VocabShard, gather_global_ids, topk_global

RULES = ("speculative", "mixture")
TEACHER_STREAM_SALT = 0x7EAC  # separates the teacher's draws from the student's stream of the same seed


@dataclass(frozen=True)
class CoSampling:
    """How a step's token is chosen from both models (module docstring)."""
    rule: str
    top_k: int = 1              # speculative: the teacher's acceptance set
    mix_alpha: float = 0.0      # mixture: the teacher's share a

    def __post_init__(self):
        require(self.rule in RULES, "rule", self.rule, f"must be one of {RULES}")
        require(isinstance(self.top_k, int) and self.top_k >= 1, "top_k", self.top_k, "must be an integer >= 1")
        require(0.0 <= self.mix_alpha <= 1.0, "mix_alpha", self.mix_alpha, "must lie in [0, 1]")


@dataclass
class CoGenerationOutput(GenerationOutput):
    # per row: tokens the teacher chose (speculative: replaced proposals; mixture: 0); counted on the last
    # pipeline stage (0 on the others)
    teacher_tokens: list[int] = dataclasses.field(default_factory=list)


def _distribution(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The law plain sampling draws from (token_selection.sample_from_logits), as probabilities [b, V]."""
    return filter_top_k_top_p(logits.float() / config.temperature, config.top_k, config.top_p).softmax(dim=-1)


def mixture_tokens(student: torch.Tensor, teacher: torch.Tensor, config: SamplingConfig, mix_alpha: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Ids [b] drawn from a p_T + (1 - a) p_S (argmax of it when greedy), real-vocabulary logits [b, V]."""
    if config.greedy:
        return ((1.0 - mix_alpha) * student.float().softmax(-1) + mix_alpha * teacher.float().softmax(-1)).argmax(-1)
    probs = (1.0 - mix_alpha) * _distribution(student, config) + mix_alpha * _distribution(teacher, config)
    return draw(probs, generator)


def speculative_tokens(student: torch.Tensor, teacher: torch.Tensor, config: SamplingConfig, top_k: int,
                       generators: tuple[torch.Generator, torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b], replaced [b] bool): the student's proposal where the teacher ranks it within its top-K, else the
    teacher's draw from its top-K. Both draws are made for every row, so the streams never depend on the data."""
    vocab = student.shape[-1]
    shard = VocabShard.of(teacher, None, vocab)
    proposal = select_tokens(student, config, vocab, generators[0])
    kth = topk_global(teacher, min(top_k, vocab), shard)[0][:, -1]
    accepted = gather_global_ids(teacher, proposal.unsqueeze(1), shard).squeeze(1) >= kth
    teacher_rule = dataclasses.replace(config, top_k=min(top_k, config.top_k) if config.top_k else top_k)
    replacement = select_tokens(teacher, teacher_rule, vocab, generators[1])
    return torch.where(accepted, proposal, replacement), ~accepted


@torch.no_grad()
def co_generate(student, teacher, prompts: list[list[int]], config: SamplingConfig, rule: CoSampling, *,
                eos_token_ids: Iterable[int], pad_token_id: int, vocab_size: int,
                generator_seed: int = 0) -> CoGenerationOutput:
    """Responses for ``prompts`` chosen by ``rule`` from both models, identical on every model-parallel rank; the
    arguments mean what they mean for generate.generate (same seed: the student's draws are plain generation's)."""
    device = _device(student)
    generators = (torch.Generator(device=device).manual_seed(int(generator_seed)),
                  torch.Generator(device=device).manual_seed(int(generator_seed) ^ TEACHER_STREAM_SALT))
    teacher_tokens = torch.zeros(len(prompts) * config.num_samples, dtype=torch.long, device=device)

    def pick(logits, done):
        s, t = (x[:, :vocab_size] for x in logits)
        if rule.rule == "speculative":
            new, replaced = speculative_tokens(s, t, config, rule.top_k, generators)
            teacher_tokens.add_((replaced & ~done).long())
            return new
        return mixture_tokens(s, t, config, rule.mix_alpha, generators[0])

    decoded = decode([student, teacher], prompts, config, pick, eos_token_ids=eos_token_ids,
                     pad_token_id=pad_token_id, vocab_size=vocab_size)   # log-probabilities: the student's
    return CoGenerationOutput(**output_fields(*decoded, config), teacher_tokens=teacher_tokens.tolist())
