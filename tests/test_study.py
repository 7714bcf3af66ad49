"""tsdkd-study: the table maths, resumability (a finished run is never rerun; a missing method is reported and picked
up by a later run; a failed run is retried), study-file errors, and one real tiny run through the demo's launcher."""
from __future__ import annotations

import json
import math
import os

import pytest

from megatron_tsdkd.study.command import main as study_main
from megatron_tsdkd.study.command import run_study
from megatron_tsdkd.study.runner import RESULT, write_json
from megatron_tsdkd.study.spec import StudyError, load_study
from megatron_tsdkd.study.tables import cell_scores, final_scalar_table, gap_recovered, main_table, mean_sd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(ROOT, "megatron_tsdkd/assets/demo/data/eval.jsonl")
REFERENCES = {"student": {"t": 0.25}, "teacher": {"t": 0.75}}


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)   # study files name the base config and launcher relative to the repository


def test_mean_sd_and_gap_recovered():
    mean, sd = mean_sd([0.3, 0.5])
    assert mean == pytest.approx(0.4) and sd == pytest.approx(math.sqrt(0.02))   # sample sd: sum sq / (n - 1)
    assert mean_sd([0.7]) == (0.7, None)
    assert gap_recovered(0.5, 0.25, 0.75) == pytest.approx(0.5)
    assert gap_recovered(0.1, 0.25, 0.75) == pytest.approx(-0.3)    # worse than the untrained student
    assert gap_recovered(0.5, 0.4, 0.4) is None


def test_cell_scores_and_tables():
    results = [{"cell": "a", "seed": 1, "accuracy": {"t": 0.5, "u": 0.2}},
               {"cell": "a", "seed": 2, "accuracy": {"t": 0.7, "u": 0.4}},
               {"cell": "b", "seed": 1, "accuracy": {"t": 0.25}}]
    scores = cell_scores(results, REFERENCES, ["t", "u"])
    a = scores["a"]["t"]
    assert (a.mean, a.n) == (pytest.approx(0.6), 2) and a.sd == pytest.approx(math.sqrt(0.02))
    assert a.gap_recovered == pytest.approx(0.7)
    assert scores["a"]["u"].gap_recovered is None       # no reference on task u
    assert scores["b"]["t"].sd is None and scores["b"]["t"].gap_recovered == pytest.approx(0.0)
    table = main_table(["a", "b", "c"], scores, REFERENCES, ["t", "u"], {"c": "missing"})
    lines = table.splitlines()
    assert "| a | 2 | 60.0 +- 14.1 | 30.0 +- 14.1 | 70% | - |" in lines
    assert "| b | 1 | 25.0 | - | 0% | - |" in lines
    assert "| c | - | missing | missing | - | - |" in lines
    results[0]["final_scalars"] = {"grad_share/direct": 0.2, "loss/total": 1.0}
    results[1]["final_scalars"] = {"grad_share/direct": 0.4}
    assert final_scalar_table(["a", "b"], results).splitlines()[2:] == ["| a | 0.300 |"]


def _study_file(tmp_path, cells, ablation=None) -> str:
    tree = {"base": "configs/demo_cpu.yaml", "launcher": "slurm/demo_cpu.sh", "seeds": [1, 2],
            "tasks": {"t": EVAL}, "cells": cells, "ablation": ablation or {}}
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(tree))   # JSON is YAML
    return str(path)


class FakeRunner:
    """Stands in for the launcher + tsdkd-eval: accuracy = 0.25 + 0.1 * seed (+0.2 for cell b)."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, run):
        self.calls.append((run.cell, run.seed))
        if (run.cell, run.seed) in self.fail:
            raise RuntimeError("training failed (exit 1)")
        return {"accuracy": {"t": 0.25 + 0.1 * run.seed + (0.2 if run.cell == "b" else 0.0)}, "train_seconds": 1.0}


def _fake_eval(model, settings, folder):
    return {"t": 0.75 if "teacher" in model else 0.25}


def test_resumable_missing_and_failed_runs(tmp_path):
    cells = {"a": ["method.name=gkd"], "b": ["method.name=kd", "rollout.on_policy_prob=0"],
             "ghost": ["method.name=not_yet_written"]}
    path, out = _study_file(tmp_path, cells, {"GKD": "a", "later": "ghost"}), str(tmp_path / "out")
    first = FakeRunner(fail={("b", 2)})
    summary = run_study(path, out, runner=first, evaluator=_fake_eval, progress=False, say=lambda *_: None)
    assert first.calls == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]   # the first seed of every cell first
    assert summary["status"] == {"ghost": "missing", "b": "failed"}
    assert summary["scores"]["a"]["t"]["mean"] == pytest.approx(0.4)
    assert summary["scores"]["b"]["t"]["n"] == 1
    text = open(os.path.join(out, "study.md")).read()
    assert "| ghost | - | missing | - |" in text and "| later | ghost | missing | - |" in text
    assert not os.path.exists(os.path.join(out, "runs", "b-seed2", RESULT))

    second = FakeRunner()   # only the failed run again; finished runs and references are read back
    summary = run_study(path, out, runner=second, evaluator=lambda *a: pytest.fail("references re-evaluated"),
                        progress=False, draw=False, say=lambda *_: None)
    assert second.calls == [("b", 2)]
    assert summary["scores"]["b"]["t"]["mean"] == pytest.approx(0.6) and summary["status"] == {"ghost": "missing"}

    os.remove(os.path.join(out, "runs", "a-seed1", RESULT))
    summary = run_study(path, out, runner=pytest.fail, evaluator=_fake_eval, progress=False, draw=False,
                        report_only=True, say=lambda *_: None)   # --report: tables of what is there, no training
    assert summary["status"] == {"ghost": "missing", "a": "pending"} and summary["scores"]["a"]["t"]["n"] == 1
    third = FakeRunner()
    run_study(path, out, runner=third, evaluator=_fake_eval, progress=False, draw=False, say=lambda *_: None)
    assert third.calls == [("a", 1)]


def test_study_file_errors(tmp_path):
    with pytest.raises(StudyError, match=r"cells\.bad: .*batch\.micro_size"):
        run_study(_study_file(tmp_path, {"bad": ["batch.micro_size=5"]}), str(tmp_path / "o"),
                  runner=FakeRunner(), evaluator=_fake_eval, progress=False)
    with pytest.raises(StudyError, match=r"cells\.a: seed=3: the study sets"):
        load_study(_study_file(tmp_path, {"a": ["seed=3"]}))
    with pytest.raises(StudyError, match=r"ablation\.x: names no cell"):
        load_study(_study_file(tmp_path, {"a": ["method.name=gkd"]}, {"x": "nope"}))
    with pytest.raises(SystemExit):
        study_main([_study_file(tmp_path, {"student": []}), "--output", str(tmp_path / "o")])


def test_one_real_run_through_the_launcher(tmp_path, monkeypatch):
    """A few SFT steps of the demo at TP=1 on one process, exported and scored by tsdkd-eval on 8 problems."""
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    cells = {"sft": ["method.name=sft", "rollout.on_policy_prob=0", "parallel.tensor=1", "schedule.max_steps=3",
                     "batch.global_size=8", "batch.micro_size=8"]}
    tree = json.loads(open(_study_file(tmp_path, cells)).read())
    tree.update(seeds=[1], eval_limit=8)
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(tree))
    out = str(tmp_path / "out")
    for name in ("student", "teacher"):   # the references are measured elsewhere: pre-written, hence not rerun
        write_json(os.path.join(out, "references", name, RESULT), {"accuracy": {"t": 0.25 if name == "student" else 1.0}})
    summary = run_study(str(path), out, progress=False, draw=False, say=lambda *_: None)
    assert summary["status"] == {}, open(os.path.join(out, "runs", "sft-seed1", "train.log")).read()[-3000:]
    result = summary["runs"][0]
    assert result["cell"] == "sft" and 0.0 <= result["accuracy"]["t"] <= 1.0 and result["train_seconds"] > 0
    with open(os.path.join(out, "runs", "sft-seed1", "predictions-t.jsonl")) as f:
        assert sum(1 for _ in f) == 8
    assert result["final_scalars"]["loss/ce"] > 0     # read back from the run's TensorBoard
