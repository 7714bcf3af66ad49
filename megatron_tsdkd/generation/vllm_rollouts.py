"""On-policy rollouts on colocated vLLM replicas, for either training engine.

Layout: every training rank holds one TP=1 replica (generation/vllm_replica.py). A data-parallel rank's prompts are
shared out over its model-parallel group (the TP x PP ranks that train one copy of the student): each rank
generates a contiguous share, and the group all-gathers the responses, so every rank ends with the same rows the
megatron decode would give it, and every GPU of the group decodes rather than one. Each response is drawn with its
own seed, derived from the step's seed and the row's index in the data-parallel rank's batch, so what a row holds
depends on the weights and that seed, not on the model-parallel layout.

Weight sync: after an optimizer step the trainer calls ``weights_changed``; the next rollout first streams the
student's weights into the replica (``stream_weights``: a callable returning an iterator of (HF name, tensor),
collective over the model-parallel group) and reports the seconds it took (``time/weight_sync``). A replica that
sleeps between rollouts (GPU sleep mode drops its weights) is fed before every rollout.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, Sequence

import torch

from megatron_tsdkd.generation.generate import GenerationOutput
from megatron_tsdkd.generation.sampling_config import SamplingConfig
from megatron_tsdkd.runtime.collectives import all_gather_objects
from megatron_tsdkd.runtime.seeds import derive_seed


def _share(count: int, parts: int, index: int) -> range:
    """The contiguous share of ``count`` items that part ``index`` of ``parts`` takes (the first ones take one
    more when ``count`` does not divide)."""
    base, extra = divmod(count, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


class RolloutEngineError(RuntimeError):
    """The vLLM replica failed during the run; the message is one line naming the setting to change."""


def _engine_failure(what: str, error: BaseException) -> RolloutEngineError:
    detail = (str(error).strip().splitlines() or [""])[0][:300]
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        advice = ("lower rollout.vllm_memory_fraction if training ran out, raise it if vLLM did; or shorten "
                  "rollout.max_new_tokens, or set rollout.engine=megatron")
    else:
        advice = "set rollout.engine=megatron to sample with our own decode"
    return RolloutEngineError(f"rollout.engine=vllm: the vLLM replica failed while {what} "
                              f"({type(error).__name__}: {detail}); {advice}. The last checkpoint is intact.")


class VllmRollouts:
    """A rollout backend (generation/rollout_backends.py) on this rank's replica; ``stop_ids`` end a response."""

    syncs_weights = True

    def __init__(self, replica, stream_weights: Callable[[], Iterator[tuple[str, torch.Tensor]]],
                 stop_ids: Iterable[int], group=None):
        import torch.distributed as dist

        self.replica, self.stream_weights, self.group = replica, stream_weights, group
        self.stop_ids = tuple(stop_ids)
        initialized = dist.is_initialized()
        self.parts = dist.get_world_size(group) if initialized else 1
        self.index = dist.get_rank(group) if initialized else 0
        self.stale = True   # nothing loaded yet: the replica holds vLLM's dummy weights
        replica.sleep()     # GPU: free its memory for the first training step until the first rollout

    def weights_changed(self) -> None:
        """The student's weights moved (an optimizer step, a resumed checkpoint): sync before the next rollout."""
        self.stale = True

    def sync(self) -> float:
        """Feed the replica the student's current weights if it lacks them; the seconds it took (0 if it had them).
        Collective over the model-parallel group (all its ranks are equally stale)."""
        if not (self.stale or self.replica.weights_lost_when_asleep):
            return 0.0
        start = time.perf_counter()
        try:
            self.replica.load_weights(self.stream_weights())
        except Exception as error:   # noqa: BLE001 - any failure inside vLLM ends the run with one line
            raise _engine_failure("loading the new weights", error) from error
        self.stale = False
        return time.perf_counter() - start

    def generate(self, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                 generator_seed: int) -> tuple[GenerationOutput, float]:
        """``config.num_samples`` responses per prompt for this data-parallel rank (GenerationOutput's order), with
        their log-probabilities, identical on every rank of the model-parallel group; and the seconds the weight
        sync took."""
        sync_seconds = self.sync()
        n = config.num_samples
        mine = _share(len(prompts), self.parts, self.index)
        seeds = [derive_seed(generator_seed, row) for p in mine for row in range(p * n, (p + 1) * n)]
        try:
            out = (self.replica.generate([prompts[p] for p in mine], config, eos_token_ids=self.stop_ids,
                                         seeds=seeds) if len(mine) else GenerationOutput([], [], [], []))
            self.replica.sleep()
        except Exception as error:   # noqa: BLE001 - any failure inside vLLM ends the run with one line
            raise _engine_failure("sampling", error) from error
        mine = (out.responses, out.finished, out.logprobs or [])
        shares = all_gather_objects(mine, group=self.group) if self.parts > 1 else [mine]
        responses = [r for rows, _, _ in shares for r in rows]
        finished = [f for _, flags, _ in shares for f in flags]
        logprobs = [s for _, _, scores in shares for s in scores]
        return GenerationOutput(responses, [i // n for i in range(len(responses))], finished, logprobs), sync_seconds

    def close(self) -> None:
        self.replica.close()


def colocated_vllm_rollouts(hf_dir: str, *, dtype: torch.dtype, tokens, max_model_len: int, max_rows: int,
                            memory_fraction: float, seed: int, stream_weights, group) -> VllmRollouts:
    """This rank's replica of the student (config.json of ``hf_dir``) and its rollout driver: both engines build
    their vLLM rollouts here. ``tokens``: the run's TokenSpec (real vocabulary, stop ids); ``max_rows``: the
    responses a rank samples per step; ``group``: the ranks that train one copy of the student."""
    from megatron_tsdkd.generation.vllm_replica import VllmReplica   # imports vLLM, an optional dependency

    replica = VllmReplica(hf_dir, dtype=dtype, vocab_size=tokens.vocab_size, max_model_len=max_model_len,
                          max_rows=max_rows, memory_fraction=memory_fraction, seed=seed)
    return VllmRollouts(replica, stream_weights, tokens.stop_ids, group)
