"""``tsdkd-study STUDY.yaml --output DIR``: train every (cell, seed) of a study, score each, print the tables.

    tsdkd-study configs/study_demo.yaml --output outputs/study_demo          # resumable: re-run to add what is missing
    tsdkd-study configs/study_demo.yaml --output outputs/study_demo --list   # the runs and their state; trains nothing
    tsdkd-study configs/study_demo.yaml --output outputs/study_demo --report # the tables of what has finished

Prints (and writes to DIR/study.md, with every number in DIR/study.json) the paper-shaped table: accuracy
mean +- sd over seeds per cell and task and the fraction of the teacher-student gap recovered, then the ablation
table when the study defines one. DIR/study.png is drawn when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from megatron_tsdkd.study import runner as study_runner
from megatron_tsdkd.study.spec import StudyError, load_study
from megatron_tsdkd.study.tables import ablation_table, cell_scores, final_scalar_table, main_table


def _parse(argv):
    p = argparse.ArgumentParser(prog="tsdkd-study", description=__doc__.split("\n")[0])
    p.add_argument("study", help="study YAML (configs/study_*.yaml)")
    p.add_argument("--output", required=True, help="folder for the runs, study.json, study.md, study.png")
    p.add_argument("--list", action="store_true", help="list the runs and whether each is done; run nothing")
    p.add_argument("--report", action="store_true",
                   help="tables from the finished runs only (unfinished ones: pending); train nothing, e.g. while "
                        "another tsdkd-study fills the same folder")
    p.add_argument("--no-plot", action="store_true", help="skip study.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    return p.parse_args(argv)


def plot(scores, cells, tasks, references, path) -> bool:
    """Bar chart of mean accuracy (error bars: sd) per cell and task; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [c for c in cells if scores.get(c)]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown) + 2), 4))
    width = 0.8 / max(len(tasks), 1)
    for k, task in enumerate(tasks):
        xs = [i + k * width for i in range(len(shown))]
        means = [100 * scores[c][task].mean if task in scores[c] else 0 for c in shown]
        sds = [100 * (scores[c][task].sd or 0) if task in scores[c] else 0 for c in shown]
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=task)
        for ref, style in (("student", ":"), ("teacher", "--")):
            if task in references.get(ref, {}):
                ax.axhline(100 * references[ref][task], linestyle=style, color="grey", linewidth=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shown))], shown, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)  [dotted: student, dashed: teacher]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run_study(study_path: str, out_dir: str, *, runner: Optional[Callable] = None,
              evaluator: Optional[Callable] = None, progress: bool = True, draw: bool = True,
              report_only: bool = False, say=print) -> dict:
    """The whole study; ``runner(run) -> {"accuracy": {...}, ...}`` and ``evaluator(model, settings, folder)``
    replace the subprocess training and tsdkd-eval (tests). ``report_only``: no training (the references are
    still scored if they have no result). Returns what study.json holds."""
    study = load_study(study_path)
    runs, status = study_runner.plan_runs(study, out_dir)
    settings, models = study_runner.eval_settings(study, out_dir)
    runner = None if report_only else runner or study_runner.SubprocessRunner(study, settings)
    evaluator = evaluator or study_runner.evaluate
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(models) + len(runs), desc="study", unit="run", dynamic_ncols=True)
    try:
        references = study_runner.reference_results(models, settings, out_dir, evaluator, bar)
        results, failed = study_runner.run_all(runs, runner, bar, say)
    finally:
        if bar is not None:
            bar.close()
    status.update(failed)
    tasks = list(settings.tasks)
    scores = cell_scores(results, references, tasks)
    cells = list(study.cells)
    text = "## Accuracy (mean +- sd over seeds) and teacher-student gap recovered\n\n" + \
        main_table(cells, scores, references, tasks, status)
    if study.ablation:
        text += "\n\n## Ablation\n\n" + ablation_table(study.ablation, scores, tasks, status)
    shares = final_scalar_table(cells, results)
    if shares:
        text += "\n\n## Share of each loss term in the logit-gradient norm, last logged step (mean over seeds)\n\n" + shares
    summary = {
        "study": study_path, "base": study.base, "seeds": list(study.seeds), "tasks": settings.tasks,
        "references": references, "status": status,
        "scores": {c: {t: vars(s) for t, s in per.items()} for c, per in scores.items()},
        "runs": results,
    }
    os.makedirs(out_dir, exist_ok=True)
    study_runner.write_json(os.path.join(out_dir, "study.json"), summary)
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write(text + "\n")
    say(text)
    if draw:
        if plot(scores, cells, tasks, references, os.path.join(out_dir, "study.png")):
            say(f"plot: {os.path.join(out_dir, 'study.png')}")
        else:
            say("plot skipped: matplotlib is not installed (pip install matplotlib to get study.png)")
    return summary


def list_runs(study_path: str, out_dir: str) -> None:
    study = load_study(study_path)
    runs, status = study_runner.plan_runs(study, out_dir)
    for cell in (c for c, s in status.items() if s == "missing"):
        print(f"{cell}: missing (method {study_runner.method_of(study, study.cells[cell])} is not registered)")
    for run in runs:
        state = "done" if study_runner.read_result(run.folder) else "to run"
        print(f"{run.cell} seed {run.seed}: {state}  ({run.folder})")


def main(argv=None) -> None:
    args = _parse(argv)
    try:
        if args.list:
            list_runs(args.study, args.output)
        else:
            run_study(args.study, args.output, progress=not args.no_progress, draw=not args.no_plot,
                      report_only=args.report)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
