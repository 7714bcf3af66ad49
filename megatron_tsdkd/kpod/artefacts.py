"""The prepared folder: one inspectable file per artefact, each written atomically (tmp file + os.replace), so a
file that exists is complete and a rerun of the preparation skips it.

    steps.jsonl          {"line", "prompt_ids", "response_ids", "token_steps", "n_steps", "steps"}  per example
    token_weighting.pt   the trained module's state dict (torch)
    weights.jsonl        {"line", "weights"}: w_j per response token (1.0 on answer tokens)
    difficulty.jsonl     {"line", "difficulty"}: d_k per rationale step
    clusters.json        {"labels", "centroids", "k"}
    schedule.json        {"settings", "T", "total", "budget", "learned", "given": [[c_i(t)] per stage]}
"""
from __future__ import annotations

import json

from megatron_tsdkd.runtime.atomic_files import write_atomic

STEPS, MODULE, WEIGHTS, DIFFICULTY = "steps.jsonl", "token_weighting.pt", "weights.jsonl", "difficulty.jsonl"
CLUSTERS, SCHEDULE = "clusters.json", "schedule.json"
ALL = (STEPS, MODULE, WEIGHTS, DIFFICULTY, CLUSTERS, SCHEDULE)


def write_jsonl(path: str, rows) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    write_atomic(path, write)


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
