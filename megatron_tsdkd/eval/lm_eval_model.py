"""Our megatron-core models as an lm-evaluation-harness model (``--model tsdkd``), at any TP/PP/DP.

    lm_eval --model tsdkd --model_args pretrained=ckpts/run,tp=2,pp=1 --tasks gsm8k   # under torchrun
    tsdkd-eval --model ckpts/run --tp 2 --tasks tsdkd_paper --data-dir benchmarks_data --output results/run

- ``generate_until``: our KV-cached ``generate`` (generation/generate.py), batched; greedy when the task's
  gen_kwargs say ``do_sample: false`` / ``temperature: 0``, else sampled with temperature/top_p/top_k; the decoded
  text is cut at the first stop string (``until``, plus the EOS text), as lm-eval's HF backend does.
- ``loglikelihood`` / ``loglikelihood_rolling``: one forward pass per batch through the pipeline stages; the last
  stage keeps the vocab-sharded logits (no full-vocabulary gather) and scores them with the chunked vocab-parallel
  cross-entropy forward (losses/cross_entropy.label_log_probs): log p(token) = logit[token] (from its owning TP
  rank) - logsumexp over the shards, and the greedy flag (the token is the first maximal column, as HF's argmax),
  ``chunk_size`` tokens at a time, so only one chunk is ever upcast to fp32 (not the whole [batch, seq, V/TP]
  logits: ~20 GB at 16 x 2048 x 152k).
- Tokenisation is lm-eval's own (``TemplateLM._encode_pair``, rolling windows from ``lm_eval.utils``), with the same
  truncation rules as ``lm_eval.models.huggingface.HFLM``, so the two backends score the same token sequences.

Ranks. lm-eval's evaluator runs on every process; each process tells it ``rank 0 of world 1``, so every process
builds the same requests and calls these methods in lockstep. Inside, the requests are sharded by data-parallel
rank (replica r takes every DP-th batch of requests), each replica's model-parallel ranks run that share together,
and the answers are all-gathered over the data-parallel group back into request order. Every process therefore
returns identical results and lm-eval's metrics are identical everywhere; only global rank 0 reports, shows the
progress bar and writes files.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megatron_tsdkd.data import ChatTemplateTokenizer
from megatron_tsdkd.generation import SamplingConfig, generate
from megatron_tsdkd.generation.stage_forward import padding_aware_attention, pipeline_dtype
from megatron_tsdkd.losses.cross_entropy import label_log_probs
from megatron_tsdkd.models import check_parallel_layout
from megatron_tsdkd.models.dtypes import DTYPES
from megatron_tsdkd.models.source import load_model, resolve_model_source
from megatron_tsdkd.models.token_spec import load_tokenizer, token_spec
from megatron_tsdkd.runtime import ParallelLayout, init_distributed
from megatron_tsdkd.runtime.collectives import all_gather_objects, group_device


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not _rank0() or total == 0, dynamic_ncols=True)


@register_model("tsdkd")
class TsdkdLM(TemplateLM):
    """``TsdkdLM(model, tokenizer, tokens)`` wraps a loaded stage (models/source.load_model); ``--model tsdkd``
    builds one from ``pretrained=PATH[,tp=N,pp=N,dtype=bf16,batch_size=N,max_length=N,chunk_size=N,format=auto]``
    (``chunk_size``: tokens per fp32 chunk of the log-likelihood scoring)."""

    def __init__(self, model, tokenizer, tokens, *, batch_size: int = 16, max_length: int = 2048,
                 max_gen_toks: int = 256, seed: int = 1234, chat_template: Optional[str] = None,
                 chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.tokens = tokens                      # TokenSpec: stop ids, pad id, real and padded vocabulary
        self.batch_size = int(batch_size)
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._calls = 0                           # sampled generation: a fresh, reproducible seed per call
        self._chat_template = chat_template
        self.chunk_size = int(chunk_size)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "TsdkdLM":
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"})
        return cls.from_path(**args)

    @classmethod
    def from_path(cls, pretrained: str, tp: int = 1, pp: int = 1, dtype: str = "fp32", format: str = "auto",
                  **kwargs) -> "TsdkdLM":
        """Resolve, check and load ``pretrained`` (HF folder, megatron checkpoint or run folder) at TP x PP,
        initialising torch.distributed from the launcher's environment if nobody has yet."""
        tp, pp = int(tp), int(pp)
        source = resolve_model_source(pretrained, format)
        check_parallel_layout(source.hf_config, tp, pp)
        source.check_weights()
        chat = ChatTemplateTokenizer(load_tokenizer(source.meta_dir))
        tokens = token_spec(chat, [source], tp)
        init_distributed(ParallelLayout(tp, pp))
        model = load_model(source, dtype=DTYPES[dtype], padded_vocab_size=tokens.padded_vocab_size)
        kwargs = {k: int(v) if k in ("batch_size", "max_length", "max_gen_toks", "seed", "chunk_size") else v
                  for k, v in kwargs.items()}
        return cls(model, chat.tokenizer, tokens, **kwargs)

    # ------------------------------------------------------------------------------------------ lm-eval facts
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tsdkd").replace("/", "__")

    def chat_template(self, chat_template=False) -> Optional[str]:
        if not chat_template:
            return None
        return self._chat_template or getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        # As HFLM for causal models: no special tokens added unless asked (HFLM's add_bos_token=False default).
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------ DP sharding
    def _sharded(self, items: list, run_batch, desc: str) -> list:
        """``run_batch(list) -> list`` over ``items`` in batches, the batches dealt round-robin to data-parallel
        replicas; results all-gathered over the DP group back into item order (identical on every rank)."""
        from megatron.core import parallel_state as ps

        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        batches = [list(range(i, min(i + self.batch_size, len(items)))) for i in range(0, len(items),
                                                                                    self.batch_size)]
        mine = {}
        bar = _progress(len(items), desc)
        was_training = self.model.training
        self.model.eval()
        try:
            # Every replica runs the same number of rounds (an empty share in the last round is skipped).
            for round_start in range(0, len(batches), dp_size):
                index = round_start + dp_rank
                if index < len(batches):
                    answers = run_batch([items[i] for i in batches[index]])
                    mine.update(zip(batches[index], answers))
                bar.update(sum(len(b) for b in batches[round_start:round_start + dp_size]))
        finally:
            bar.close()
            self.model.train(was_training)
        if dp_size == 1:
            return [mine[i] for i in range(len(items))]
        merged = {}
        for part in all_gather_objects(mine, group=ps.get_data_parallel_group()):
            merged.update(part)
        return [merged[i] for i in range(len(items))]

    # ------------------------------------------------------------------------------------------ log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation), context_ids, continuation_ids); sum of log p and greedy flag."""
        rows = []
        for _, context_ids, continuation_ids in requests:
            whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1):]
            rows.append((whole[:-1], min(len(continuation_ids), len(whole) - 1), whole[-1]))   # inputs, targets scored, last target
        return self._sharded(rows, self._score_batch, "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for index, request in enumerate(requests):
            (string,) = request.args
            for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, window[0], window[1]))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        return totals

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], int, int]]) -> list[tuple[float, bool]]:
        """Right-padded batch of inputs; per row the log-prob of its last ``n`` targets and whether each was the
        argmax. Collective over the model-parallel group; every rank returns the same values."""
        from megatron.core import parallel_state as ps

        device = next(self.model.parameters()).device
        width = max(len(r[0]) for r in rows)
        pad = self.tokens.pad_id
        tokens = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        labels = torch.full((len(rows), width), pad, dtype=torch.long, device=device)   # the token after each
        valid = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        scored = torch.zeros((len(rows), width), dtype=torch.bool, device=device)      # the last n positions
        for i, (ids, n, final) in enumerate(rows):
            tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[i, :len(ids)] = torch.tensor(ids[1:] + [final], dtype=torch.long)
            valid[i, :len(ids)] = True
            scored[i, len(ids) - n:len(ids)] = True
        logits = _full_forward(self.model, tokens, valid)      # [b, s, V/TP] on the last stage, else None
        result = torch.zeros((len(rows), 2), dtype=torch.float64, device=device)
        if logits is not None:
            tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 \
                else None
            logprob, greedy = label_log_probs(logits, labels, scored, tp_group, self.tokens.vocab_size,
                                              self.chunk_size)   # per scored position, row-major
            row = scored.nonzero()[:, 0]
            result[:, 0].index_add_(0, row, logprob.double())
            misses = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row, (~greedy).double())
            result[:, 1] = (misses == 0).double()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            result = result.to(group_device(ps.get_pipeline_model_parallel_group()))
            dist.broadcast(result, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return [(float(a), bool(b)) for a, b in result.cpu().tolist()]

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        items = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen} must be below max_length {self.max_length}")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            items.append((ids, until, max_gen, bool(kwargs.get("do_sample", False)),
                          float(kwargs.get("temperature", 0.0) or 0.0), float(kwargs.get("top_p", 1.0) or 1.0),
                          int(kwargs.get("top_k", 0) or 0)))
        # Rows of one generate() call share their settings: group by settings, keep the order of the requests.
        order = sorted(range(len(items)), key=lambda i: (items[i][2:], -len(items[i][0])))
        answers = self._sharded([(i, items[i]) for i in order], self._generate_batch, "generate_until")
        out = [""] * len(items)
        for i, text in zip(order, answers):
            out[i] = text
        return out

    def _generate_batch(self, batch) -> list[str]:
        from lm_eval.models.utils import postprocess_generated_text

        texts = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for position, (_, item) in enumerate(batch):
            groups.setdefault(item[2:], []).append(position)
        for (max_gen, do_sample, temperature, top_p, top_k), positions in groups.items():
            greedy = not do_sample or temperature == 0.0
            config = SamplingConfig(max_new_tokens=max_gen, greedy=greedy,
                                    temperature=temperature if not greedy else 1.0, top_p=top_p, top_k=top_k)
            self._calls += 1
            out = generate(self.model, [batch[p][1][0] for p in positions], config,
                           eos_token_ids=self.tokens.stop_ids, pad_token_id=self.tokens.pad_id,
                           vocab_size=self.tokens.vocab_size, generator_seed=self.seed + self._calls)
            for p, response in zip(positions, out.responses):
                text = self.tok_decode(response)
                texts[p] = postprocess_generated_text(text, batch[p][1][1], None)
        return texts


def _full_forward(model, tokens: torch.Tensor, valid: torch.Tensor) -> Optional[torch.Tensor]:
    """Every position's logits, vocab-sharded [b, s, V/TP], on the last pipeline stage (None elsewhere): the
    stages' hidden states travel by p2p as in generation/stage_forward.py, but without an inference context and
    without the TP gather (``runtime_gather_output=False``). ``valid`` [b, s] marks real tokens (right padding)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    model = unwrap_model(model)
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device)
    mask = (positions[None, :] > positions[:, None])[None, None] | ~valid[:, None, None, :]   # True = forbidden
    pp_group = ps.get_pipeline_model_parallel_group()
    dtype = pipeline_dtype(model)
    with padding_aware_attention(model):
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(seq, batch, model.config.hidden_size, dtype=dtype, device=tokens.device)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank(), group=pp_group)
            model.set_input_tensor(hidden)
        output = model(tokens, positions.expand(batch, seq), mask, runtime_gather_output=False)
        if not ps.is_pipeline_last_stage():
            dist.send(output.to(dtype).contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(), group=pp_group)
            return None
    return output
