"""Length-aware micro-batches (issue 18): each micro-batch padded to its own longest row (at PP > 1 through
megatron-core's variable sequence lengths) gives the losses and gradients of padding every micro-batch to the
step's longest row, at PP=1, PP=2 and TP2xPP2, which reproduce each other; sorting the step's rows by length
changes no token-decomposable loss."""
import pytest
import torch
from harness import run_parallel, run_serial
from test_train import overrides, workdir  # noqa: F401 - the tiny teacher/student pair and data set

STEPS = 2
CASES = [  # (method, on-policy, sort_by_length)
    ("gkd", True, False), ("gkd", True, True), ("tsdkd", False, False)]


def _pad_to_step(batches, pad_id):
    """The micro-batches as the trainer padded them before: every one right-padded to the step's longest row."""
    from megatron_tsdkd.data.collate import TrainingBatch

    width = max(b.input_ids.shape[1] for b in batches)
    out = []
    for b in batches:
        extra = width - b.input_ids.shape[1]
        pad = lambda t, value: torch.nn.functional.pad(t, (0, extra), value=value)  # noqa: E731
        out.append(TrainingBatch(
            input_ids=pad(b.input_ids, pad_id), labels=pad(b.labels, pad_id), loss_mask=pad(b.loss_mask, 0.0),
            position_ids=torch.arange(width, device=b.position_ids.device).expand(b.input_ids.shape[0], width),
            prompt_lengths=b.prompt_lengths, lengths=b.lengths))
    return out


def _padding_runs(argv, cases=CASES):
    """Per case and padding ("own": today's micro_batches, "step": the old padding): the logged losses and gradient
    norms of every step, and the micro-batch widths of each step."""
    import megatron_tsdkd.engines.trainer as trainer_module
    from megatron_tsdkd.config import load_config

    length_aware = trainer_module.micro_batches
    out = {}
    for method, on_policy, sort in cases:
        for padding in ("own", "step") if not sort else ("own",):
            widths = []

            def recorded(pairs, micro_size, pad_id, max_length, device=None, padding=padding, **options):
                batches, length = length_aware(pairs, micro_size, pad_id, max_length, device, **options)
                if padding == "step":
                    batches = _pad_to_step(batches, pad_id)
                widths.append([b.input_ids.shape[1] for b in batches])
                return batches, length

            trainer_module.micro_batches = recorded
            try:
                cfg = load_config(None, argv + [f"method.name={method}", f"batch.sort_by_length={str(sort).lower()}",
                                                f"rollout.on_policy_prob={1.0 if on_policy else 0.0}"])
                history = trainer_module.build_trainer(cfg).train()
            finally:
                trainer_module.micro_batches = length_aware
            out[method, sort, padding] = {
                "metrics": [{k: v for k, v in h.metrics.items() if k.startswith("loss/") or k in (
                    "optim/grad_norm", "tokens/response")} for h in history if h.metrics],
                "widths": widths}
    return out


@pytest.fixture(scope="module")
def layout_runs(workdir, tmp_path_factory):  # noqa: F811
    argv = overrides(workdir, extra=["batch.global_size=8", "batch.micro_size=2", f"schedule.max_steps={STEPS}",
                                     "rollout.greedy=true", "rollout.max_new_tokens=16", "logging.interval=1",
                                     f"checkpoint.dir={tmp_path_factory.mktemp('ck')}"])
    return {"pp1": run_serial(_padding_runs, argv),
            "pp2": run_parallel(_padding_runs, argv + ["parallel.pipeline=2"], world_size=2, pp=2)[0],
            "tp2pp2": run_parallel(_padding_runs, argv + ["parallel.pipeline=2", "parallel.tensor=2"], CASES[:1],
                                   world_size=4, tp=2, pp=2)[0]}   # the teacher-and-rollout case only: cheaper


def _close(a: dict, b: dict, rel: float, what) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert abs(a[key] - b[key]) <= rel * max(abs(a[key]), 1e-6), (what, key, a[key], b[key])


def test_own_length_padding_changes_no_loss_and_no_gradient(layout_runs):
    for layout, runs in layout_runs.items():
        for method, _, sort in CASES:
            if sort or (method, False, "own") not in runs:
                continue
            own, step = runs[method, False, "own"], runs[method, False, "step"]
            assert len(own["metrics"]) == STEPS and len(own["widths"]) == STEPS
            for s, (a, b) in enumerate(zip(own["metrics"], step["metrics"])):
                _close(a, b, 1e-6, (layout, method, s))
            # the old padding: one width per step; the new one: narrower micro-batches where the rows are shorter
            assert all(len(set(w)) == 1 for w in step["widths"]), step["widths"]
            assert any(len(set(w)) > 1 for w in own["widths"]), own["widths"]
            assert [max(w) for w in own["widths"]] == [w[0] for w in step["widths"]]


def test_sorting_rows_by_length_keeps_token_decomposable_losses(layout_runs):
    for layout in ("pp1", "pp2"):
        plain, sort = layout_runs[layout]["gkd", False, "own"], layout_runs[layout]["gkd", True, "own"]
        for s, (a, b) in enumerate(zip(plain["metrics"], sort["metrics"])):
            _close(a, b, 1e-5, (layout, "sorted", s))
        assert sum(map(sum, sort["widths"])) < sum(map(sum, plain["widths"])), (sort["widths"], plain["widths"])


def test_pipeline_and_tensor_parallel_reproduce_serial(layout_runs):
    serial = layout_runs["pp1"]
    for layout in ("pp2", "tp2pp2"):
        for key, run in layout_runs[layout].items():
            assert run["widths"] == serial[key]["widths"], (layout, key)
            for s, (a, b) in enumerate(zip(run["metrics"], serial[key]["metrics"])):
                _close(a, b, 2e-5, (layout, key, s))


def test_micro_batches_pad_each_to_its_own_longest_row():
    """Widths per micro-batch; each row's tensors are the old step-padded ones cut to that width; sorting groups
    similar lengths and keeps every row; a response is still cut at max_length."""
    from megatron_tsdkd.data.collate import collate_training, micro_batches

    pairs = [([1, 2], [3]), ([1] * 5, [4] * 6), ([1], [5, 6]), ([2] * 3, [7] * 9), ([1], [8])]
    batches, length = micro_batches(pairs, 2, 0, max_length=10)
    assert [b.input_ids.shape[1] for b in batches] == [10, 10, 2] and length == 10   # row 3 cut to 10 tokens
    old = collate_training([(p, r[:10 - len(p)]) for p, r in pairs], 0, pad_to=10)
    for i, b in enumerate(batches):
        width = b.input_ids.shape[1]
        for name in ("input_ids", "labels", "loss_mask", "position_ids"):
            assert torch.equal(getattr(b, name), getattr(old, name)[2 * i:2 * i + 2, :width]), (i, name)
    ragged, _ = micro_batches(pairs[:4], 2, 0, max_length=64)
    assert [b.input_ids.shape[1] for b in ragged] == [11, 12]
    grouped, _ = micro_batches(pairs[:4], 2, 0, max_length=64, sort_by_length=True)
    assert [b.input_ids.shape[1] for b in grouped] == [3, 12]
    assert sorted(b.lengths.tolist() for b in grouped) == [[3, 3], [11, 12]]
