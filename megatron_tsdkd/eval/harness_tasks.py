"""lm-evaluation-harness tasks for tsdkd-eval: the paper's task group, offline data, the sandboxed MBPP metric,
and one ``run_tasks`` that every caller (tsdkd-eval, the tests' stub models) goes through.

Offline data. No hub at run time: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set, and while tasks are built each
lm-eval task's dataset loading (``ConfigurableTask.download``) reads local files instead, per leaf task:

    DATA_DIR/<task>/<split>.{parquet,jsonl,json,arrow}      e.g. DATA_DIR/gsm8k/test.jsonl, DATA_DIR/sciq/test.parquet

in the columns the benchmark publishes (the Hugging Face data set named by the task's ``dataset_path`` /
``dataset_name``). The split evaluated (``test_split``, else ``validation_split``) is required; the few-shot split
too when few-shot examples are drawn from data. A missing file stops with one line naming the files expected.

MBPP. lm-eval's mbpp metric loads HF ``evaluate``'s ``code_eval`` from the hub when the task is built (and needs
HF_ALLOW_CODE_EVAL=1); our pipeline builds mbpp from lm-eval's own YAML with that metric replaced by
``sandbox.pass_at_1`` (a separate process per sample under bubblewrap, or a best-effort guard only after the user
opts in: sandbox.py). Prompts, few-shot samples
and the rest of the task stay lm-eval's.

IFEval. lm-eval's ifeval imports nltk and asks for its ``punkt_tab`` data (not on PyPI, so not installable
offline here): the instructions that count sentences or words need it; the others score without it.
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import os
from typing import Optional

from megatron_tsdkd.eval.sandbox import pass_at_1, refusal

# The ten benchmarks of the TSD-KD paper, by their lm-eval 0.4.13 names (groups are kept as lm-eval defines them).
PAPER_TASKS = ("gsm8k", "gsm_plus", "minerva_math", "mmlu_pro_math", "mmlu_stem", "sciq", "mbpp", "bbh",
               "leaderboard_musr", "ifeval")
PAPER_GROUP = "tsdkd_paper"
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")


class TaskError(ValueError):
    """A user error about tasks or their data: one sentence, shown as is."""


def offline_env() -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


_MANAGER = None


def task_manager():
    global _MANAGER
    if _MANAGER is None:
        offline_env()
        from lm_eval.tasks import TaskManager

        _MANAGER = TaskManager()
    return _MANAGER


def expand_task_names(spec: str) -> list[str]:
    """``gsm8k,sciq`` or ``tsdkd_paper`` -> lm-eval task/group names, each checked against lm-eval's index."""
    names = []
    for name in (n.strip() for n in spec.split(",")):
        if not name:
            continue
        names.extend(PAPER_TASKS if name == PAPER_GROUP else [name])
    if not names:
        raise TaskError("--tasks names no task")
    index = task_manager().task_index
    for name in names:
        if name not in index:
            close = difflib.get_close_matches(name, list(index) + [PAPER_GROUP], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TaskError(f"unknown task {name!r}{hint}; `lm_eval ls tasks` lists them, {PAPER_GROUP} runs the "
                            f"paper's ten")
    return list(dict.fromkeys(names))


def leaf_tasks(name: str) -> list[str]:
    """The leaf task names under a task or group (for data-file checks)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index[name]
    if entry.kind.name not in ("GROUP", "TAG"):
        return [name]
    if entry.kind.name == "TAG":
        return sorted(entry_name for entry_name, e in task_manager().task_index.items()
                      if name in (getattr(e, "tags", None) or ()))
    cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else entry.cfg
    leaves = []
    for member in cfg.get("task", []):
        member = member if isinstance(member, str) else member.get("task") or member.get("group")
        leaves.extend(leaf_tasks(member) if member in task_manager().task_index else [member])
    return leaves


def _config(name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task_manager().task_index[name].yaml_path, resolve_func=False)


def _needed_splits(cfg: dict, num_fewshot: Optional[int]) -> list[str]:
    split = cfg.get("test_split") or cfg.get("validation_split")
    needed = [split] if split else []
    shots = cfg.get("num_fewshot", 0) if num_fewshot is None else num_fewshot
    samples = (cfg.get("fewshot_config") or {}).get("samples")
    fewshot = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    if shots and not samples and fewshot and fewshot not in needed:
        needed.append(fewshot)
    return needed


def _split_file(data_dir: str, task: str, split: str) -> Optional[str]:
    for suffix in DATA_SUFFIXES:
        path = os.path.join(data_dir, task, split + suffix)
        if os.path.exists(path):
            return path
    return None


def check_data(names: list[str], data_dir: str, num_fewshot: Optional[int]) -> None:
    """Every leaf task's required split files exist under ``data_dir``; else one line naming them."""
    for name in names:
        for leaf in leaf_tasks(name):
            cfg = _config(leaf)
            for split in _needed_splits(cfg, num_fewshot):
                if _split_file(data_dir, leaf, split) is None:
                    where = os.path.join(data_dir, leaf, split)
                    raise TaskError(f"no local data for {leaf} (from {name}): expected {where}"
                                    f"{{{','.join(DATA_SUFFIXES)}}} with the columns of the Hugging Face data set "
                                    f"{cfg.get('dataset_path')}"
                                    f"{'/' + cfg['dataset_name'] if cfg.get('dataset_name') else ''}")


def _load_local(path: str):
    import datasets

    if path.endswith(".parquet"):
        return datasets.Dataset.from_parquet(path)
    if path.endswith(".arrow"):
        return datasets.Dataset.from_file(path)
    return datasets.Dataset.from_json(path)


@contextlib.contextmanager
def local_datasets(data_dir: str):
    """While tasks are built, every ConfigurableTask reads DATA_DIR/<task>/<split>.* instead of the hub."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    original = ConfigurableTask.download

    def download(self, dataset_kwargs=None, **kwargs):
        task = self.config.task
        splits = {}
        for split in (self.config.training_split, self.config.validation_split, self.config.test_split,
                      self.config.fewshot_split):
            if split and split not in splits:
                path = _split_file(data_dir, task, split)
                if path is not None:
                    splits[split] = _load_local(path)
        evaluated = self.config.test_split or self.config.validation_split
        if evaluated not in splits:
            raise TaskError(f"no local data for {task}: expected {os.path.join(data_dir, task, evaluated)}"
                            f"{{{','.join(DATA_SUFFIXES)}}}")
        for split in (self.config.training_split, self.config.validation_split, self.config.fewshot_split):
            if split and split not in splits:   # tasks look at their few-shot split when built: an empty one
                splits[split] = splits[evaluated].select([])   # (check_data requires it when shots are drawn)
        self.dataset = datasets.DatasetDict(splits)

    ConfigurableTask.download = download
    try:
        yield
    finally:
        ConfigurableTask.download = original


def _mbpp_spec() -> dict:
    """lm-eval's mbpp task with its hub-loaded code_eval metric replaced by the sandbox (see module doc)."""
    refused = refusal()
    if refused:
        raise TaskError(refused)
    cfg = _config("mbpp")
    cfg["metric_list"] = [{"metric": pass_at_1, "aggregation": "mean", "higher_is_better": True}]
    samples = (cfg.get("fewshot_config") or {}).get("samples")
    if isinstance(samples, str):   # `!function utils.list_fewshot_samples`: take it without importing utils.py
        cfg["fewshot_config"] = dict(cfg["fewshot_config"], samples=_function_from_source(samples))
    return cfg


def _function_from_source(ref: str):
    module_path, name = ref.rsplit(".", 1)
    with open(module_path + ".py") as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope: dict = {}
    exec(compile(ast.Module([node], []), module_path + ".py", "exec"), scope)  # a literal-returning function
    return scope[name]


def task_specs(names: list[str]) -> list:
    """What simple_evaluate gets for ``names``: the names, with mbpp as its sandboxed config."""
    return [_mbpp_spec() if name == "mbpp" else name for name in names]


def run_tasks(lm, names: list[str], *, data_dir: Optional[str] = None, limit: Optional[int] = None,
              num_fewshot: Optional[int] = None, apply_chat_template: bool = False, seed: int = 1234,
              gen_kwargs: Optional[dict] = None) -> dict:
    """lm-eval's ``simple_evaluate`` of ``lm`` on ``names`` (every process calls it with the same arguments);
    tasks are built (and their data read from ``data_dir``) inside it, by lm-eval."""
    from lm_eval import evaluator

    offline_env()
    with (local_datasets(data_dir) if data_dir else contextlib.nullcontext()):
        return evaluator.simple_evaluate(
            model=lm, tasks=task_specs(names), limit=limit, num_fewshot=num_fewshot,
            apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template, log_samples=True,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=0, confirm_run_unsafe_code=True, gen_kwargs=gen_kwargs, task_manager=task_manager())
