"""The study's numbers: per cell and task, accuracy mean +- sd over seeds and the teacher-student gap recovered.

    mean = (1/n) sum_s acc_s,   sd = sqrt( sum_s (acc_s - mean)^2 / (n - 1) )   (sample sd; none for n = 1)
    gap recovered = (mean - acc_student0) / (acc_teacher - acc_student0)     (none when teacher == student0)

acc_student0 is the untrained student of the base config, acc_teacher the teacher, both scored like every cell.
A negative gap recovered means the method made the student worse than where it started.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Score:
    mean: float
    sd: Optional[float]         # None with one seed
    n: int
    gap_recovered: Optional[float]

    def text(self) -> str:
        """'35.5 +- 1.0' in percent (no sd with one seed)."""
        sd = "" if self.sd is None else f" +- {100 * self.sd:.1f}"
        return f"{100 * self.mean:.1f}{sd}"


def mean_sd(values: list[float]) -> tuple[float, Optional[float]]:
    if not values:
        raise ValueError("mean_sd needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def gap_recovered(accuracy: float, student0: float, teacher: float) -> Optional[float]:
    gap = teacher - student0
    return None if gap == 0 else (accuracy - student0) / gap


def cell_scores(results: list[dict], references: dict[str, dict[str, float]], tasks: list[str]
                ) -> dict[str, dict[str, Score]]:
    """cell -> task -> Score, from finished run results ({"cell", "seed", "accuracy": {task: acc}}); cells whose
    runs have not finished are absent. ``references`` holds {"student": {task: acc}, "teacher": {task: acc}}."""
    by_cell: dict[str, list[dict]] = {}
    for result in results:
        by_cell.setdefault(result["cell"], []).append(result)
    scores = {}
    for cell, runs in by_cell.items():
        scores[cell] = {}
        for task in tasks:
            values = [r["accuracy"][task] for r in runs if task in r.get("accuracy", {})]
            if not values:
                continue
            mean, sd = mean_sd(values)
            student0, teacher = references.get("student", {}).get(task), references.get("teacher", {}).get(task)
            gap = None if student0 is None or teacher is None else gap_recovered(mean, student0, teacher)
            scores[cell][task] = Score(mean, sd, len(values), gap)
    return scores


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _gap_text(score: Optional[Score]) -> str:
    return "-" if score is None or score.gap_recovered is None else f"{100 * score.gap_recovered:.0f}%"


def main_table(cells: list[str], scores, references, tasks: list[str], status: dict[str, str]) -> str:
    """One row per cell (the references first): accuracy mean +- sd per task, then the gap recovered per task.
    A cell without results shows its status (missing: method not registered; failed; pending)."""
    header = ["method", "seeds"] + [f"{t} acc (%)" for t in tasks] + [f"{t} gap recovered" for t in tasks]
    rows = []
    for ref in ("student", "teacher"):
        if ref in references:
            values = [f"{100 * references[ref][t]:.1f}" if t in references[ref] else "-" for t in tasks]
            rows.append([f"{ref} (no training)", "-"] + values + ["0%" if ref == "student" else "100%"] * len(tasks))
    for cell in cells:
        per_task = scores.get(cell, {})
        if not per_task:
            rows.append([cell, "-"] + [status.get(cell, "pending")] * len(tasks) + ["-"] * len(tasks))
            continue
        n = max(s.n for s in per_task.values())
        rows.append([cell, str(n)] + [per_task[t].text() if t in per_task else "-" for t in tasks]
                    + [_gap_text(per_task.get(t)) for t in tasks])
    return markdown(header, rows)


def ablation_table(ablation: dict[str, str], scores, tasks: list[str], status: dict[str, str]) -> str:
    """The paper's ablation shape: one row per label (GKD, +gate, ...), the cell it names, accuracy per task."""
    header = ["variant", "cell"] + [f"{t} acc (%)" for t in tasks] + [f"{t} gap recovered" for t in tasks]
    rows = []
    for label, cell in ablation.items():
        per_task = scores.get(cell, {})
        accs = [per_task[t].text() if t in per_task else status.get(cell, "pending") for t in tasks]
        rows.append([label, cell] + accs + [_gap_text(per_task.get(t)) for t in tasks])
    return markdown(header, rows)


def final_scalar_table(cells: list[str], results: list[dict], prefix: str = "grad_share/") -> str:
    """Per cell, the mean over seeds of the last logged value of each TensorBoard scalar named ``prefix``*
    (e.g. grad_share/direct: which loss term drives the update at the end of training); '' when none logs one."""
    names = sorted({k for r in results for k in r.get("final_scalars", {}) if k.startswith(prefix)})
    if not names:
        return ""
    rows = []
    for cell in cells:
        runs = [r.get("final_scalars", {}) for r in results if r["cell"] == cell]
        values = [[run[name] for run in runs if name in run] for name in names]
        if any(values):
            rows.append([cell] + [f"{mean_sd(v)[0]:.3f}" if v else "-" for v in values])
    return markdown(["method"] + names, rows)
