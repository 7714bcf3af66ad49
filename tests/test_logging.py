"""What an operator sees (issue 13): rank 0's text lines without a terminal, the progress bar only on one and named
after the method, the start-up summary, ``--print-config`` and ``--dry-run``, TensorBoard without replayed steps
after a resume, ``optim/lr`` of the step it applied to, eval accuracy in TensorBoard, and library warnings filtered."""
import io
import json
import logging
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from harness import run_parallel

REPO = os.path.join(os.path.dirname(__file__), "..")
DEMO_TOKENIZER = os.path.join(REPO, "megatron_tsdkd", "assets", "demo", "teacher")
STEPS, WARMUP, LR = 5, 2, 1e-3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny teacher (Qwen2) and student (Llama) sharing the demo tokenizer, training data and 4 eval problems
    (the pattern of test_train.py's fixture)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from megatron_tsdkd.data.arithmetic_chains import make_problems

    root = tmp_path_factory.mktemp("logging")
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=False,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_attention_heads=4,
                  num_key_value_heads=2)
    teacher = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **common))
    student = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, **common))
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    problems = make_problems(seed=7, count=36)
    with open(root / "train.jsonl", "w") as f:
        for p in problems[:32]:
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution, "answer": p.answer}) + "\n")
    with open(root / "eval.jsonl", "w") as f:
        for p in problems[32:]:
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")
    return root


def overrides(root, tmp, extra=()):
    return [
        f"models.student.path={root}/student", f"models.teacher.path={root}/teacher", f"data.train={root}/train.jsonl",
        "method.name=gkd", "rollout.on_policy_prob=0", "data.max_length=64", "data.max_prompt_length=32",
        "precision.dtype=fp32", "batch.global_size=4", "batch.micro_size=2", f"schedule.max_steps={STEPS}",
        f"schedule.warmup_fraction={WARMUP / STEPS}", f"optimizer.lr={LR}", "rollout.max_new_tokens=8",
        "method.chunk_size=16", f"logging.dir={tmp}/tb", f"checkpoint.dir={tmp}/ck", "checkpoint.interval=2",
        "checkpoint.resume=auto", *extra,
    ]


def scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def expected_lr(step):
    """The rate step ``step`` (1-based) applies: linear warm-up from 0 over WARMUP steps, then cosine to 0."""
    done = step - 1   # the scheduler has advanced once per finished step
    if done <= WARMUP:
        return LR * done / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (done - WARMUP) / (STEPS - WARMUP)))


class Terminal(io.StringIO):
    def isatty(self):
        return True


# ---------------------------------------------------------------------------------------------------------------
# Without process groups: the text line, the progress bar, the TensorBoard purge, the warning filters, the CLI


def test_text_lines_or_a_bar_named_after_the_method(tmp_path, caplog):
    from megatron_tsdkd.engines.metrics import MetricsLogger

    metrics = {"loss/total": 0.5, "loss/direct": 0.25, "loss/entropy": 2.5, "throughput/tokens_per_s": 1234.0,
               "optim/lr": 2.5e-4, "optim/grad_norm": 0.75, "time/rollout": 0.1, "time/step": 0.5}
    caplog.set_level(logging.INFO, logger="megatron_tsdkd.train")
    for progress_bar, stream in ((False, Terminal()), (True, io.StringIO()), (True, Terminal())):
        caplog.clear()
        logger = MetricsLogger(str(tmp_path / "tb"), 80, 0, progress_bar, name="gkd", stream=stream)
        logger.log(10, metrics)
        logger.close()
        lines = [r.getMessage() for r in caplog.records if r.name == "megatron_tsdkd.train"]
        if progress_bar and stream.isatty():   # the bar alone, named after the method
            assert lines == [] and "gkd" in stream.getvalue() and "gkd: " not in lines
            continue
        assert logger.bar is None and stream.getvalue() == ""
        assert len(lines) == 1, lines
        line = lines[0]
        assert line.startswith("step 10/80 (12%) | eta "), line
        for part in ("loss 0.5 (direct 0.25, entropy 2.5)", "1,234 tokens/s per replica", "lr 2.500e-04",
                     "grad norm 0.75", "peak RSS ", " GiB", "time 0.50s (rollout 0.10)"):
            assert part in line, (part, line)


def test_tensorboard_after_a_resume_holds_each_step_once_with_the_new_values(tmp_path):
    from megatron_tsdkd.engines.metrics import MetricsLogger

    first = MetricsLogger(str(tmp_path), 5, 0, False)
    for step in range(1, 6):
        first.log(step, {"loss/total": float(step)})
    first.close()
    resumed = MetricsLogger(str(tmp_path), 5, 2, False)   # the checkpoint was at step 2; 3..5 were lost
    for step in (3, 4):
        resumed.log(step, {"loss/total": 100.0 + step})
    resumed.close()
    assert scalars(tmp_path, "loss/total") == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]


def test_warning_filters_hide_only_what_a_user_cannot_act_on(monkeypatch):
    from megatron_tsdkd.runtime import warnings as filters

    def shown(cpu, message, category, module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert filters.install(cpu=cpu)
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
        return len(caught) == 1

    library = [  # (message, category, module, hidden on GPU too)
        ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning,
         "megatron.core.transformer.transformer_config", True),
        ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single`"
         " instead.", FutureWarning, "torch.distributed.c10d_logger", True),
        ("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning, "torch.distributed.c10d_logger",
         True),
        ("`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.",
         FutureWarning, "megatron.core.dist_checkpointing.strategies.torch", True),
        ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.", UserWarning,
         "megatron_tsdkd.runtime.cpu_shim", True),
        ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.", UserWarning,
         "megatron.core.optimizer.optimizer", True),
        ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
         "megatron.core.optimizer", False),
        ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends", False),
        ("When using async grad allreduce it is recommended to set the environment variable "
         "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup", UserWarning, "megatron.core.tensor_parallel.layers",
         False),
        ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
         "megatron_tsdkd.runtime.cpu_shim", True),
        ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
         "torch.distributed._shard.sharded_tensor", True),
        ("`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead",
         FutureWarning, "vllm.triton_utils.dispatcher", True),
    ]
    for message, category, module, everywhere in library:
        assert not shown(True, message, category, module), message
        assert shown(False, message, category, module) != everywhere, message
    actionable = [  # a user can do something about these: they stay
        ("method.beta ignored: not settings of method sft", UserWarning, "megatron_tsdkd.config"),
        ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.", UserWarning, "my_script"),
        ("some other megatron-core warning", UserWarning, "megatron.core.optimizer"),
        ("`torch.distributed.some_new_call` is deprecated", FutureWarning, "torch.distributed.c10d_logger"),
    ]
    for message, category, module in actionable:
        assert shown(True, message, category, module) and shown(False, message, category, module), message
    monkeypatch.setattr(sys, "warnoptions", ["default"])   # -W / PYTHONWARNINGS: the user's filters rule
    assert not filters.install(cpu=True)


def test_vllm_start_notes_filtered_and_shown_again_with_pythonwarnings(monkeypatch, capfd):
    """vLLM's log notes that do not apply (CPU build, eager replica, weightless layers) are dropped at the logger
    that emits them; others stay; the native NUMA line is dropped from descriptor 2; -W / PYTHONWARNINGS shows all."""
    import logging

    from megatron_tsdkd.runtime import warnings as filters

    def logged(cpu, name, message):
        logger = logging.getLogger(name)
        for f in list(logger.filters):
            logger.removeFilter(f)
        filters.install(cpu=cpu)
        record = logger.makeRecord(name, logging.WARNING, "x.py", 1, message, (), None)
        return logger.filter(record)

    notes = [("vllm.v1.worker.cpu_worker", "libtcmalloc is not found in LD_PRELOAD. For best performance", False),
             ("vllm.v1.worker.cpu_worker", "CPU backend doesn't allow to use `torch.set_num_threads` after the thread "
              "binding, skip it.", False),
             ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
              False),
             ("vllm.platforms.cpu", "Triton is not installed. triton-cpu is expected on x86 CPUs.", False),
             ("vllm.config.vllm", "Model Runner V2 requires Triton; using the V1 model runner instead.", False),
             ("vllm.config.vllm", "Enforce eager set, disabling torch.compile, CUDAGraphs", False),
             ("vllm.model_executor.model_loader.reload.layerwise", "RotaryEmbedding: Failed to load weights", True),
             ("vllm.model_executor.model_loader.reload.layerwise", "ParallelLMHead: Failed to load weights", True)]
    for name, message, everywhere in notes:
        assert not logged(True, name, message), message
        assert logged(False, name, message) != everywhere, message
    for name, message in (("vllm.model_executor.model_loader.reload.layerwise", "QKVParallelLinear: Failed to load "
                           "weights"), ("vllm.v1.worker.cpu_worker", "Node 1 is not in available memory nodes [0]."),
                          ("vllm.config.vllm", "some new note")):
        assert logged(True, name, message), message

    import os
    capfd.readouterr()
    with filters.native_stderr_filtered():
        os.write(2, b"[rank0]:[W1206 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory\n")
        os.write(2, b"a native line that stays\n")
    assert capfd.readouterr().err == "a native line that stays\n"
    monkeypatch.setattr(sys, "warnoptions", ["default"])   # -W / PYTHONWARNINGS: everything shows
    with filters.native_stderr_filtered():
        os.write(2, b"Warning: NUMA binding: Using MEMBIND policy\n")
    assert "NUMA binding" in capfd.readouterr().err


def test_print_config_and_dry_run_errors_in_one_line(workdir, tmp_path, monkeypatch, capsys):
    from megatron_tsdkd.commands import train as command
    from megatron_tsdkd.config import load_config, to_dict
    from megatron_tsdkd.planning import run_plan as preflight

    argv = overrides(workdir, tmp_path)

    def built(*_):
        raise AssertionError("--print-config read the inputs")

    monkeypatch.setattr(preflight, "preflight", built)
    command.main(["--config", "configs/demo_cpu.yaml", *argv, "--print-config"])   # returns: exit code 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out) == to_dict(load_config("configs/demo_cpu.yaml", argv)) and out.err == ""
    monkeypatch.undo()

    monkeypatch.setenv("WORLD_SIZE", "1")   # the world --dry-run plans for
    for extra, start in ((["memory.gpu_memory_gib=1"], "error: parallel layout: the planned memory per GPU exceeds 1"),
                         (["memory.host_memory_gib=0.5"], "error: host memory: 1 rank on this node need "),
                         (["parallel.tensor=3"], "error: parallel: "),
                         (["parallel.tensor=2"], "error: parallel: tensor x pipeline = 2 x 1 = 2 does not divide the"),
                         (["method.bet=1"], "error: overrides: method.bet: unknown key"),
                         (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag")):
        with pytest.raises(SystemExit) as stop:
            command.main(["--config", "", *argv, *extra, "--dry-run"])   # "": no file, the overrides only
        out = capsys.readouterr()
        assert stop.value.code == 2 and out.err.count("\n") == 1 and out.err.startswith(start), (extra, out.err)
        if "gpu_memory" in extra[0]:   # the rest of the planner's message, the table, goes to stdout
            assert "per rank, GiB" in out.out and "verdict: DOES NOT FIT" in out.out, out.out


def test_dry_run_in_a_fresh_process_plans_for_the_launch_world(workdir, tmp_path):
    """As the launcher runs it before torchrun: the world from WORLD_SIZE, nothing built, nothing on stderr, and
    none of the libraries' import-time warnings (Transformer Engine / Apex on CPU) in the output."""
    env = {**os.environ, "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run([sys.executable, "-m", "megatron_tsdkd.cli", "train", "--config", "configs/demo_cpu.yaml",
                          "--dry-run", *overrides(workdir, tmp_path), "parallel.tensor=1", "checkpoint.export_hf=",
                          f"data.eval={workdir}/eval.jsonl"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == "", (run.returncode, run.stderr, run.stdout)
    out = run.stdout
    for part in ("run: method gkd, student ", "layout: TP=1 PP=1 DP=2, world size 2; 1 micro-batch of 2 sequences",
                 "memory plan verdict: FITS", f"steps: {STEPS} from the start; checkpoints every 2 steps",
                 "data: ", "32/32 examples kept", "eval: 4 problems", "config (keys that differ from the defaults",
                 "  method: name=gkd", "per rank, GiB", "nothing was built"):
        assert part in out, (part, out)
    assert "Warning" not in out and "not installed" not in out, out
    assert not (tmp_path / "ck").exists() and not (tmp_path / "tb").exists()


# ---------------------------------------------------------------------------------------------------------------
# A real job on 2 ranks (DP=2): killed after step 3, resumed by the job; then a fresh job that evaluates first


def _logged_runs(killed_argv, job_argv, fresh_argv):
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.job import run_job
    from megatron_tsdkd.engines.trainer import build_trainer

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    project = logging.getLogger("megatron_tsdkd")
    handler, level = Keep(), project.level
    project.addHandler(handler)
    project.setLevel(logging.INFO)   # as tsdkd-train configures it
    out = {}
    try:
        build_trainer(load_config(None, killed_argv)).train(stop_after=3)   # like kill -9 after step 3
        out["killed"], records[:] = list(records), []
        for name, argv in (("resumed", job_argv), ("fresh", fresh_argv)):
            run_job(load_config(None, argv))
            out[name], records[:] = list(records), []
    finally:
        project.removeHandler(handler)
        project.setLevel(level)
    return out


def _step_lines(lines):
    return [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step ") and " | eta " in line]


def test_rank0_logs_summary_and_a_line_per_interval_and_tensorboard_tells_the_truth(workdir, tmp_path, monkeypatch,
                                                                                      capsys):
    resumed_dir, fresh_dir = tmp_path / "run", tmp_path / "fresh"
    killed = overrides(workdir, resumed_dir, ["logging.progress_bar=true", "parallel.tensor=1"])  # no terminal here
    job = killed + [f"data.eval={workdir}/eval.jsonl"]
    fresh = overrides(workdir, fresh_dir, ["logging.progress_bar=false", "logging.interval=2", "schedule.max_steps=3",
                                           "checkpoint.interval=0", f"data.eval={workdir}/eval.jsonl"])
    rank0, rank1 = run_parallel(_logged_runs, killed, job, fresh, world_size=2)
    for lines in rank1.values():   # only global rank 0 logs the summary and the steps
        assert not _step_lines(lines) and not any(l.startswith(("layout:", "steps:")) for l in lines), lines

    # (a) one text line per logged step, also with progress_bar=true when stderr is no terminal
    assert _step_lines(rank0["killed"]) == [1, 2, 3]
    assert _step_lines(rank0["resumed"]) == [3, 4, 5]
    assert _step_lines(rank0["fresh"]) == [2, 3]   # logging.interval=2, and the last step
    line = next(line for line in rank0["killed"] if line.startswith("step 2/5"))
    for part in ("(40%) | eta ", "| loss ", "(jsd ", "tokens/s per replica", "| lr 5.000e-04 |", "| grad norm ",
                 "| peak RSS ", " GiB", "s (rollout 0.00, teacher_forward "):
        assert part in line, (part, line)

    # (c) the start-up summary comes before the first step line
    summary = rank0["killed"][:rank0["killed"].index(next(l for l in rank0["killed"] if l.startswith("step 1/5")))]
    text = "\n".join(summary)
    for part in ("run: method gkd, student ", "layout: TP=1 PP=1 DP=2, world size 2; 1 micro-batch of 2 sequences "
                 "per step on each data-parallel rank (global batch 4)", "memory plan verdict: FITS",
                 f"steps: {STEPS} from the start; checkpoints every 2 steps in {resumed_dir}/ck",
                 "data: ", "32/32 examples kept", "config (keys that differ from the defaults",
                 "  method: name=gkd", "  batch: global_size=4 micro_size=2"):
        assert part in text, (part, text)
    assert any(l.startswith(f"steps: resuming at step 2 of {STEPS} (3 to go)") for l in rank0["resumed"])
    assert any(l.startswith("layout: ") for l in rank0["fresh"])   # logged by the job, before its evaluation

    # (e) the steps between the checkpoint (2) and the kill (3) appear once; (f) lr of the step it applied to
    losses = scalars(resumed_dir / "tb", "loss/total")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5], losses
    lrs = scalars(resumed_dir / "tb", "optim/lr")
    assert [s for s, _ in lrs] == [1, 2, 3, 4, 5]
    assert lrs[0][1] == 0.0 == expected_lr(1)   # the warm-up's first value
    for step, lr in lrs:
        assert lr == pytest.approx(expected_lr(step), rel=1e-6, abs=1e-12), (step, lrs)
    assert lrs[-1][1] > 0.0 == pytest.approx(expected_lr(STEPS + 1), abs=1e-12)   # not the next step's 0

    # (g) accuracy before (fresh job only) and after, at step 0 and at the final step
    assert [s for s, _ in scalars(resumed_dir / "tb", "eval/accuracy")] == [STEPS]
    fresh_accuracy = scalars(fresh_dir / "tb", "eval/accuracy")
    assert [s for s, _ in fresh_accuracy] == [0, 3] and all(0.0 <= v <= 1.0 for _, v in fresh_accuracy)

    # --dry-run of the finished run: the step it would resume from, for the world of WORLD_SIZE
    from megatron_tsdkd.commands.train import dry_run
    from megatron_tsdkd.config import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()
    dry_run(load_config(None, killed))
    out = capsys.readouterr().out
    assert f"steps: resuming at step {STEPS} of {STEPS} (0 to go)" in out and "TP=1 PP=1 DP=2, world size 2" in out


# ---------------------------------------------------------------------------------------------------------------
# Diagnostics at their own interval; a logged step's metrics in one packed tensor and one collective per group


def test_logging_schedule_and_its_validation():
    from megatron_tsdkd.config import ConfigError, LoggingConfig, load_config

    every_3_diagnose_4 = LoggingConfig(interval=3, diagnostics_interval=4)
    assert [s for s in range(1, 11) if every_3_diagnose_4.logs(s, 10)] == [3, 4, 6, 8, 9, 10]
    assert [s for s in range(1, 11) if every_3_diagnose_4.diagnoses(s, 10)] == [4, 8, 10]   # and the last step
    assert LoggingConfig().diagnostics_interval == 50
    for key in ("logging.interval", "logging.diagnostics_interval"):
        with pytest.raises(ConfigError, match=f"^overrides: {key}: must be an integer >= 1, got 0$"):
            load_config(None, [f"{key}=0", "models.student.path=s", "data.train=t"])


def _old_reduce_to_rank0(local):
    """The hand-over before the packed tensor (a dict of host floats, then a pickled broadcast): the oracle."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.runtime.collectives import all_reduce_values, broadcast_object

    local = {k: float(v) for k, v in local.items()} if local is not None else None
    names = sorted(local) if local else None
    if ps.is_pipeline_last_stage():
        values = all_reduce_values([local[k] for k in names], group=ps.get_data_parallel_group())
        local = dict(zip(names, (values / ps.get_data_parallel_world_size()).tolist()))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        local = broadcast_object(local, src=ps.get_pipeline_model_parallel_last_rank(),
                                 group=ps.get_pipeline_model_parallel_group())
    return local if dist.get_rank() == 0 else None


def _counted_runs(runs):
    """Per run (argv): rank 0's logged metrics, the collectives ``reduce_to_rank0`` issued on this rank at each
    logged step, and whether each step's result equals the old hand-over's (computed outside the count)."""
    import torch.distributed as dist

    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines import metrics as metrics_module
    from megatron_tsdkd.engines.trainer import build_trainer

    kinds = ("all_reduce", "broadcast", "all_gather", "reduce", "send", "recv", "broadcast_object_list",
             "all_gather_object", "gather_object", "barrier")
    originals = {name: getattr(dist, name) for name in kinds}
    reduce = metrics_module.reduce_to_rank0
    calls, equal, counting = [], [], []

    def counted(name):
        def collective(*args, **kwargs):
            if counting:
                calls[-1].append(name)
            return originals[name](*args, **kwargs)
        return collective

    def watched(local, names):
        calls.append([])
        counting.append(True)
        try:
            metrics = reduce(local, names)
        finally:
            counting.pop()
        equal.append(metrics == _old_reduce_to_rank0(local))
        return metrics

    out = []
    for name in kinds:
        setattr(dist, name, counted(name))
    metrics_module.reduce_to_rank0 = watched
    try:
        for argv in runs:
            calls.clear()
            equal.clear()
            history = build_trainer(load_config(None, argv)).train()
            out.append(([(h.step, h.metrics) for h in history if h.metrics is not None], list(calls), list(equal)))
    finally:
        metrics_module.reduce_to_rank0 = reduce
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return out


def test_diagnostics_at_their_interval_and_metrics_in_one_collective_per_group(workdir, tmp_path):
    """TSD-KD for 3 steps, logging every step: with diagnostics_interval=2 the grad_share/* scalars land at steps
    2 and 3 (the last) in TensorBoard, and are the values the every-step schedule (today's) logs there; the
    training itself is unchanged. At PP=2 the last stage's metrics reach rank 0 on the first stage; per logged
    step reduce_to_rank0 issues one all-reduce (DP group, last stage) and one tensor broadcast (pipeline group), at
    DP=2 one all-reduce; never a pickled object; the values equal the old pickled hand-over's."""
    from megatron_tsdkd.losses.tsdkd import DIAGNOSTICS

    def argv(name, interval, extra=()):
        return overrides(workdir, tmp_path / name, ["method.name=tsdkd", "logging.progress_bar=false",
                                                     "checkpoint.interval=0", "checkpoint.resume=none",
                                                     "schedule.max_steps=3",
                                                     f"logging.diagnostics_interval={interval}", *extra])

    pp2 = ["parallel.tensor=1", "parallel.pipeline=2"]
    first_stage, last_stage = run_parallel(_counted_runs, [argv("every", 1, pp2), argv("sparse", 2, pp2)],
                                           world_size=2, pp=2)
    dp_runs = run_parallel(_counted_runs, [argv("dp", 2, ["parallel.tensor=1", "schedule.max_steps=1"])],
                           world_size=2)

    (every_metrics, _, every_equal), (sparse_metrics, first_stage_calls, sparse_equal) = first_stage
    last_stage_calls = last_stage[1][1]
    assert last_stage[1][0] == [] and last_stage[1][2] == [True] * 3   # only global rank 0 gets the metrics
    every_metrics = dict(every_metrics)
    assert [step for step, _ in sparse_metrics] == [1, 2, 3]
    assert [step for step, m in sparse_metrics if "grad_share/direct" in m] == [2, 3]
    for tag in DIAGNOSTICS:
        assert [step for step, _ in scalars(tmp_path / "sparse" / "tb", tag)] == [2, 3], tag
        assert [step for step, _ in scalars(tmp_path / "every" / "tb", tag)] == [1, 2, 3], tag
    assert [step for step, _ in scalars(tmp_path / "sparse" / "tb", "loss/total")] == [1, 2, 3]
    for step, m in sparse_metrics:   # the same training, and the diagnostics today's schedule logs at that step
        for name, value in m.items():
            if not name.startswith(("time/", "throughput/")):
                assert value == pytest.approx(every_metrics[step][name], rel=1e-6, abs=1e-9), (step, name)
    # per logged step: the DP all-reduce and the pipeline broadcast on the last stage, the broadcast on the first
    assert last_stage_calls == [["all_reduce", "broadcast"]] * 3, last_stage_calls
    assert first_stage_calls == [["broadcast"]] * 3, first_stage_calls
    assert sparse_equal == [True] * 3 and every_equal == [True] * 3
    for metrics, calls, equal in (rank[0] for rank in dp_runs):
        assert calls == [["all_reduce"]] and equal == [True], calls
    assert [step for step, m in dp_runs[0][0][0] if "grad_share/direct" in m] == [1]   # the last step


def test_a_writer_opened_in_the_same_second_sorts_after_the_last_event_file(tmp_path):
    """TensorBoard reads event files in name order (creation second first, then host, pid and a counter compared as
    text: "...10" before "...9"); a resumed run's file must come after the killed run's, or its steps are dropped."""
    import time

    from megatron_tsdkd.engines.metrics import summary_writer

    older = tmp_path / f"events.out.tfevents.{int(time.time()):010d}.~.1.9"   # "~" sorts after any host name
    older.write_bytes(b"")
    writer = summary_writer(str(tmp_path))
    writer.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == older.name, names
