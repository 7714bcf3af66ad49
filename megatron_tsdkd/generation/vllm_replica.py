"""A vLLM engine holding a TP=1 copy of the student inside this training process, for on-policy rollouts.

Every rank of the run builds one, together: vLLM's external-launcher mode (the mode TRL's colocate trainer uses)
builds its process groups over the torch.distributed world the trainer already started, each rank its own
replica (vLLM's tensor and pipeline sizes 1). After that a replica generates for its own prompts without any
collective. Its weights never come from disk: it starts from vLLM's dummy weights and is fed (name, tensor) pairs
in Hugging Face names by ``load_weights``, vLLM's in-place layer-by-layer reload (which also redoes the backend's
weight processing: the CPU backend repacks linear weights, so writing into the parameters directly would not do).

Two things the reload alone gets wrong, handled here:
- A layer whose weight is another layer's (a tied output layer: every small Qwen2.5 / Qwen3) is never named in
  the weights (vLLM's loader skips ``lm_head.weight`` when tied), so the reload never re-processes it: its
  parameter gets the new values through the embedding, but whatever its backend derived from the start-up
  weights stays (the CPU build's packed output matrix: greedy decoding of noise, measured on a real
  Qwen2.5-Coder-0.5B). ``_reprocess_shared_weights`` redoes the processing of every layer that shares a weight.
- A mixture-of-experts layer's experts: the kernel prepares them once, at the first load, and not on a reload
  (vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py:191-205: "setup moe kernel only on the
  first call"); the CPU build's experts pack themselves into a grouped-GEMM layout there, so a reloaded replica
  would route tokens through the start-up experts. ``_reprocess_experts`` redoes that preparation after each
  reload wherever the experts have one (the GPU kernels' hook does nothing).
- The real vocabulary: the replica is built with exactly the tokenizer's rows (``hf_overrides``), and the
  vocabulary tensors it is fed are cut to them, so ids beyond it (rows no token uses) can never be drawn and
  the log-probabilities it reports are over the same vocabulary as the trainer's (the rollout guard compares them).

Tokens in, tokens out: no tokenizer is loaded; stop ids and the sampling settings are the trainer's
(generation/sampling_config.py), turned into vLLM's ``SamplingParams`` here. Each response is its own request with
its own seed, so a response depends on its seed and the weights, not on which rank or batch drew it. With each
token comes its log-probability under the replica's weights at temperature 1 (vLLM's raw log-probabilities).

vLLM is an optional dependency (``pip install -e ".[vllm]"``): this module imports it only inside functions.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Iterable, Optional, Sequence

import torch

from megatron_tsdkd.generation.generate import GenerationOutput
from megatron_tsdkd.generation.sampling_config import SamplingConfig
from megatron_tsdkd.models.hf_config import arch_spec
from megatron_tsdkd.models.mapping import VOCABULARY_TENSORS
from megatron_tsdkd.runtime.device_choices import (release_cached_memory, vllm_attention_backend,
                                                   vllm_replica_options)
from megatron_tsdkd.runtime.warnings import native_stderr_filtered

INSTALL_HINT = 'pip install -e ".[vllm]"'


def unsupported_reason(hf_config) -> Optional[str]:
    """Why the student described by ``hf_config`` (a transformers config) cannot roll out on vLLM here, or None.
    Checked before start (``rollout.engine``): vLLM installed, the architecture in vLLM's model registry, the
    head size in the list of the attention backend vLLM uses on this device."""
    try:
        from vllm import ModelRegistry
    except ImportError as error:
        return f"vLLM is not installed ({error}); install it with {INSTALL_HINT}"
    architectures = getattr(hf_config, "architectures", None) or []
    supported = set(ModelRegistry.get_supported_archs())
    if not any(a in supported for a in architectures):
        return f"vLLM has no model for architectures {architectures or 'none given'}"
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    module, _, name = vllm_attention_backend().rpartition(".")
    backend = getattr(importlib.import_module(module), name)
    if not backend.supports_head_size(head_dim):
        return f"vLLM's attention backend here ({name}) does not support the student's head size {head_dim}"
    return None


def _reprocess_shared_weights(worker) -> int:
    """Runs inside vLLM's worker (``collective_rpc``): redo the backend's weight processing of every layer that
    shares a weight with another (module docstring); the number of layers redone. A no-op where the backend keeps
    no processed copy (the unquantized GPU layers)."""
    sharing: dict[int, list] = {}
    for module in worker.model_runner.get_model().modules():
        if getattr(module, "quant_method", None) is not None:
            for param in module.parameters(recurse=False):
                sharing.setdefault(id(param), []).append(module)
    layers = {id(m): m for group in sharing.values() if len(group) > 1 for m in group}
    for module in layers.values():
        module.quant_method.process_weights_after_loading(module)
    return len(layers)


def _reprocess_experts(worker) -> int:
    """Runs inside vLLM's worker (``collective_rpc``): redo the experts' own weight preparation of every
    mixture-of-experts layer whose kernel has one (module docstring); the number of layers redone."""
    from vllm.model_executor.layers.fused_moe import modular_kernel

    base = modular_kernel.FusedMoEExperts.process_weights_after_loading
    redone = 0
    for module in worker.model_runner.get_model().modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and type(experts).process_weights_after_loading is not base:
            experts.process_weights_after_loading(module)
            redone += 1
    return redone


def _groups_with_experts(config) -> None:
    """vLLM builds its model-parallel groups once per process, with an expert-parallel group only when that first
    engine's model is a mixture of experts (vllm/distributed/parallel_state.py:2292), and later engines reuse them;
    a MoE replica in a process whose first replica was dense would then find no EP group. Rebuild them (vLLM's
    own groups, never the trainer's world) so this engine makes them with one; the dense replicas ask for their
    groups at each call and get the new ones, of the same sizes."""
    from vllm.distributed import parallel_state as vllm_groups

    if arch_spec(config).is_moe and vllm_groups.model_parallel_is_initialized() and vllm_groups._EP is None:
        vllm_groups.destroy_model_parallel()


def _external_launcher_env() -> None:
    """The variables vLLM's external-launcher mode reads, from the running world where a launcher left them out
    (the test harness starts its workers without torchrun)."""
    import torch.distributed as dist

    if dist.is_initialized():
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")   # keep vLLM from replacing the job's logging set-up
    # Without a tokenizer vLLM's chat template warm-up fails (a traceback at start): true of every replica here.
    logging.getLogger("vllm.renderers.base").setLevel(logging.ERROR)


class VllmReplica:
    """One vLLM engine with the student's architecture (``hf_dir``: its config.json; weights unused).
    ``max_model_len``: prompt plus response tokens; ``max_rows``: responses generated at once (sizes the KV
    cache on CPU); ``memory_fraction``: its share of the GPU."""

    def __init__(self, hf_dir: str, *, dtype: torch.dtype, vocab_size: int, max_model_len: int, max_rows: int,
                 memory_fraction: float, seed: int = 0):
        import torch.distributed as dist
        from transformers import AutoConfig
        from vllm import LLM

        config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
        reason = unsupported_reason(config)
        if reason:
            raise ValueError(f"rollout.engine: {reason}")
        _external_launcher_env()
        _groups_with_experts(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
                    * torch.finfo(dtype).bits // 8 * max_model_len * max_rows)
        self.vocab_size = vocab_size
        self.options = vllm_replica_options(memory_fraction, kv_bytes + (16 << 20))
        with native_stderr_filtered():   # the CPU build's native start-up note (runtime/warnings.py)
            self.llm = LLM(
                model=hf_dir, skip_tokenizer_init=True, load_format="dummy", dtype=dtype, seed=seed,
                tensor_parallel_size=1, pipeline_parallel_size=1,
                distributed_executor_backend="external_launcher" if dist.is_initialized() else "uni",
                max_model_len=max_model_len, generation_config="vllm", disable_log_stats=True,
                enable_prefix_caching=True, hf_overrides={"vocab_size": vocab_size}, **self.options)
        self.asleep = False

    # ----------------------------------------------------------------------------------------------------------
    # weights and memory

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace every weight with ``weights`` (HF names; consumed one tensor at a time) and forget cached
        prompts, whose keys and values the old weights computed."""
        self.wake_up()
        cut = ((name, tensor[:self.vocab_size] if name in VOCABULARY_TENSORS else tensor) for name, tensor in weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": cut, "is_checkpoint_format": True})
        self.llm.collective_rpc(_reprocess_shared_weights)
        self.llm.collective_rpc(_reprocess_experts)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the KV cache and the weights while the trainer uses the GPU (sleep mode, GPU only); the next
        ``load_weights`` brings the weights back. The freed pool goes back to the device, not to PyTorch's cache."""
        if self.options.get("enable_sleep_mode") and not self.asleep:
            self.llm.sleep(level=2)
            release_cached_memory()
            self.asleep = True

    def wake_up(self) -> None:
        """Before vLLM allocates its share again, the training step's cached blocks go back to the device: the
        memory plan's rollout peak is static memory plus the replica, not plus the step's reserved peak."""
        if self.asleep:
            release_cached_memory()
            self.llm.wake_up()
            self.asleep = False

    @property
    def weights_lost_when_asleep(self) -> bool:
        return bool(self.options.get("enable_sleep_mode"))

    # ----------------------------------------------------------------------------------------------------------
    # generation

    def generate(self, prompts: Sequence[Sequence[int]], config: SamplingConfig, *, eos_token_ids: Iterable[int],
                 seeds: Sequence[int]) -> GenerationOutput:
        """``config.num_samples`` responses per prompt, row ``i`` drawn with ``seeds[i]`` (one per response, in
        GenerationOutput's order), each token with its log-probability at temperature 1; responses keep their EOS
        token, as generation/generate.py's do."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        n = config.num_samples
        rows = [list(p) for p in prompts for _ in range(n)]
        if len(seeds) != len(rows):
            raise ValueError(f"{len(rows)} responses need as many seeds, got {len(seeds)}")
        stops = sorted(set(eos_token_ids))
        common = dict(max_tokens=config.max_new_tokens, stop_token_ids=stops, ignore_eos=False, detokenize=False,
                      skip_special_tokens=False, logprobs=0, flat_logprobs=True)   # the sampled token's only
        if config.greedy:
            params = [SamplingParams(temperature=0.0, **common)] * len(rows)
        else:
            params = [SamplingParams(temperature=config.temperature, top_k=config.top_k or 0, top_p=config.top_p,
                                     seed=int(s), **common) for s in seeds]
        self.wake_up()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        responses, finished, logprobs = [], [], []
        stop_set = set(stops)
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            responses.append(tokens)
            finished.append(bool(tokens) and tokens[-1] in stop_set)
            logprobs.append(list(out.outputs[0].logprobs.logprobs))   # FlatLogprobs: one value per token here
        return GenerationOutput(responses=responses, prompt_index=[i // n for i in range(len(rows))],
                                finished=finished, logprobs=logprobs)

    def close(self) -> None:
        """Shut the engine down. vLLM's shutdown also destroys the default process group (its external-launcher
        world is ours): call it last, after the job's own collectives."""
        engine = getattr(self, "llm", None)
        if engine is not None:
            self.llm = None
            engine.llm_engine.engine_core.shutdown()

