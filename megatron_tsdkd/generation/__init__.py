"""KV-cached sampling under TP and PP, for on-policy rollouts, teacher data generation and evaluation.

sampling_config  SamplingConfig: greedy / temperature / top-k / top-p / samples per prompt
padded_batch     left-padded prompts and the causal + padding attention masks
stage_forward    one pipeline stage's forward of the new tokens, hidden states sent on by p2p
token_selection  vocab-parallel argmax; gathered-vocabulary sampling with a seeded generator
generate         the decoding loop over megatron-core's StaticInferenceContext KV cache
(The teacher-data program that uses it lives with the other programs, in commands/teacher_data.py.)
"""
from megatron_tsdkd.generation.generate import GenerationOutput, generate
from megatron_tsdkd.generation.sampling_config import SamplingConfig

__all__ = ["SamplingConfig", "GenerationOutput", "generate"]
