"""KPOD's offline preparation, resumable: each artefact (artefacts.py) is computed only if its file is missing, in
the order steps -> token weighting (+ weights) -> difficulty -> clusters -> schedule, each from the files before it.

Input: a JSONL the data loader reads (data/records.py): ``tools/generate_teacher_data.py`` output (``prompt`` and
``response``: the teacher's rationale whose last step is the answer sentence, e.g. "The answer is 17."), or a
user's own ``{"prompt": question, "response": rationale + answer sentence}`` (or ``messages``) lines.

Runs under the project's parallel state (init_distributed; every rank computes, rank 0 writes): the student is
loaded with models/source.py at the run's TP (the difficulty pass reduces over the TP group; pipeline = 1).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_tsdkd.data.chat_tokenization import ChatTemplateTokenizer, TokenizedExample
from megatron_tsdkd.data.records import read_jsonl
from megatron_tsdkd.kpod import artefacts
from megatron_tsdkd.kpod.clusters import kmeans, mean_embeddings
from megatron_tsdkd.kpod.difficulty import step_difficulties
from megatron_tsdkd.kpod.schedule import progressive_schedule
from megatron_tsdkd.kpod.steps import ANSWER, step_texts, token_steps
from megatron_tsdkd.kpod.token_weighting import TokenWeighting, WeightingConfig, token_weights, train_token_weighting
from megatron_tsdkd.models.source import load_model, resolve_model_source
from megatron_tsdkd.models.token_spec import load_tokenizer, token_spec
from megatron_tsdkd.runtime import device
from megatron_tsdkd.runtime.atomic_files import write_atomic


@dataclass(frozen=True)
class PrepareSettings:
    data: str
    student: str
    out: str
    epochs: int = 4
    beta_div: float = 12.0
    num_clusters: int = 5
    weights_in_difficulty: bool = True
    use_progression: bool = True
    use_diversity: bool = True
    weighting: WeightingConfig = WeightingConfig()
    seed: int = 0

    def schedule_settings(self) -> dict:   # the same keys as methods.kpod.KPODConfig.schedule_settings
        return {"weights_in_difficulty": self.weights_in_difficulty, "use_progression": self.use_progression,
                "beta_div": float(self.beta_div) if self.use_diversity else 0.0, "num_clusters": self.num_clusters}


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _done(path: str) -> bool:
    return os.path.isfile(path)


class _Student:
    """The student, loaded once and only if an artefact needs it (the project's loader at the run's TP)."""

    def __init__(self, path: str):
        from megatron.core import parallel_state as ps

        self.source = resolve_model_source(path)
        self.chat = ChatTemplateTokenizer(load_tokenizer(self.source.meta_dir))
        self.ps = ps
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self.tokens = token_spec(self.chat, [self.source], self.ps.get_tensor_model_parallel_world_size())
            self._model = load_model(self.source, dtype=torch.float32, padded_vocab_size=self.tokens.padded_vocab_size)
            self._model.eval()
        return self._model

    def embedding(self) -> torch.Tensor:
        """The full input embedding [V, D] (vocab shards gathered over TP), real tokens only."""
        shard = self.model.embedding.word_embeddings.weight.detach().float()
        group = self.ps.get_tensor_model_parallel_group()
        world = dist.get_world_size(group)
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts)[:self.tokens.vocab_size].cpu()   # the weighting module trains on CPU


def prepare(settings: PrepareSettings, log=print) -> None:
    os.makedirs(settings.out, exist_ok=True)
    path = lambda name: os.path.join(settings.out, name)  # noqa: E731
    student = _Student(settings.student)

    if _done(path(artefacts.STEPS)):
        log(f"{artefacts.STEPS}: present, kept")
    else:
        rows = []
        for record in read_jsonl(settings.data, "off_policy"):
            example = student.chat.encode_record(record)
            steps, n = token_steps(student.chat, record.prompt_messages, record.response, example.response_ids)
            rows.append({"line": int(record.source.rsplit(":", 1)[1]), "prompt_ids": example.prompt_ids,
                         "response_ids": example.response_ids, "token_steps": steps, "n_steps": n,
                         "steps": step_texts(record.response)})
        if _rank0():
            artefacts.write_jsonl(path(artefacts.STEPS), rows)
        _barrier()
        log(f"{artefacts.STEPS}: {len(rows)} examples")
    rows = artefacts.read_jsonl(path(artefacts.STEPS))

    def rationale(row):
        return [t for t, s in zip(row["response_ids"], row["token_steps"]) if s != ANSWER]

    if _done(path(artefacts.MODULE)) and _done(path(artefacts.WEIGHTS)):
        log(f"{artefacts.MODULE}, {artefacts.WEIGHTS}: present, kept")
    else:
        embedding = student.embedding()
        if _done(path(artefacts.MODULE)):
            module = TokenWeighting(embedding, settings.weighting.hidden)
            module.load_state_dict(torch.load(path(artefacts.MODULE)))
            module.eval()
        else:
            triples = [(r["prompt_ids"], rationale(r), [t for t, s in zip(r["response_ids"], r["token_steps"])
                                                        if s == ANSWER]) for r in rows]
            module = train_token_weighting(embedding, triples, settings.weighting)
            if _rank0():
                write_atomic(path(artefacts.MODULE), lambda tmp: torch.save(module.state_dict(), tmp))
        w_rationale = token_weights(module, [rationale(r) for r in rows])
        out = []
        for row, w in zip(rows, w_rationale):
            values = iter(w)
            out.append({"line": row["line"], "weights": [1.0 if s == ANSWER else next(values)
                                                         for s in row["token_steps"]]})
        if _rank0():
            artefacts.write_jsonl(path(artefacts.WEIGHTS), out)
        _barrier()
        log(f"{artefacts.MODULE}, {artefacts.WEIGHTS}: trained and written")
    weights = artefacts.read_jsonl(path(artefacts.WEIGHTS))

    if _done(path(artefacts.DIFFICULTY)):
        log(f"{artefacts.DIFFICULTY}: present, kept")
    else:
        model = student.model
        d = step_difficulties(model, [TokenizedExample(r["prompt_ids"], r["response_ids"]) for r in rows],
                              [r["token_steps"] for r in rows], [w["weights"] for w in weights],
                              [r["n_steps"] for r in rows], pad_id=student.tokens.pad_id,
                              vocab_size=student.tokens.vocab_size,
                              tp_group=student.ps.get_tensor_model_parallel_group(), device=device(),
                              use_weights=settings.weights_in_difficulty)
        if _rank0():
            artefacts.write_jsonl(path(artefacts.DIFFICULTY), [{"line": r["line"], "difficulty": x}
                                                              for r, x in zip(rows, d)])
        _barrier()
        log(f"{artefacts.DIFFICULTY}: {sum(len(x) for x in d)} steps")
    difficulty = [row["difficulty"] for row in artefacts.read_jsonl(path(artefacts.DIFFICULTY))]

    if _done(path(artefacts.CLUSTERS)):
        log(f"{artefacts.CLUSTERS}: present, kept")
    else:
        points = mean_embeddings(student.embedding().numpy(), [r["prompt_ids"] for r in rows])
        labels, centroids = kmeans(points, settings.num_clusters, seed=settings.seed)
        if _rank0():
            artefacts.write_json(path(artefacts.CLUSTERS), {"k": int(len(centroids)), "labels": labels.tolist(),
                                                            "centroids": np.asarray(centroids).tolist()})
        _barrier()
        log(f"{artefacts.CLUSTERS}: {len(centroids)} clusters")
    clusters = artefacts.read_json(path(artefacts.CLUSTERS))["labels"]

    if _done(path(artefacts.SCHEDULE)):
        log(f"{artefacts.SCHEDULE}: present, kept")
    else:
        s = settings.schedule_settings()
        schedule = progressive_schedule(difficulty, clusters, settings.epochs, beta_div=s["beta_div"],
                                        use_progression=settings.use_progression)
        schedule["settings"] = {**s, "epochs": settings.epochs}
        if _rank0():
            artefacts.write_json(path(artefacts.SCHEDULE), schedule)
        _barrier()
        log(f"{artefacts.SCHEDULE}: {settings.epochs} stages, T={schedule['T']}")


def settings_dict(settings: PrepareSettings) -> dict:
    return asdict(settings)
