"""The memory planner: real model sizes, the job scripts' layouts, and exact per-rank parameter and optimizer bytes
against real megatron models built on 2 gloo processes (TP=2, PP=2, DP=2)."""
import math
import os
import re

import pytest
import torch

from harness import run_parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF = os.path.join(ROOT, "configs", "hf")

# Published parameter counts (model cards / safetensors index totals).
PUBLISHED = {
    "Qwen2.5-72B-Instruct": 72_706_203_648,
    "Qwen2.5-14B-Instruct": 14_770_033_664,
    "Qwen2.5-7B-Instruct": 7_615_616_512,
    "Qwen2.5-1.5B-Instruct": 1_543_714_304,
    "Llama-3.1-70B-Instruct": 70_553_706_496,
    "Llama-3.1-8B-Instruct": 8_030_261_248,
}


# the shipped job scripts and the configs they run
JOBS = [("tsdkd_70b_to_7b.sh", "tsdkd_70b_to_7b.yaml"), ("tsdkd_70b_to_7b.sh", "tsdkd_llama70b_to_8b.yaml"),
        ("tsdkd_14b_to_1.5b.sh", "tsdkd_14b_to_1.5b.yaml"), ("tsdkd_30b_a3b_to_1.7b.sh", "tsdkd_30b_a3b_to_1.7b.yaml"),
        ("tsdkd_235b_a22b_to_8b.sh", "tsdkd_235b_a22b_to_8b.yaml")]


def spec_of(name):
    from megatron_tsdkd.planning.memory_plan import load_hf_spec

    return load_hf_spec(os.path.join(HF, name), name)[0]


def script_world_size(script):
    """Nodes x GPUs per node from a job script's #SBATCH header: the layout the script really asks for."""
    text = open(os.path.join(ROOT, "slurm", script)).read()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", text, re.M).group(1))
    return nodes * gpus


def config(name, *overrides):
    from megatron_tsdkd.config import load_config

    return load_config(os.path.join(ROOT, "configs", name), list(overrides))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_hf_configs_have_the_published_sizes(name):
    from megatron_tsdkd.planning.memory_plan import total_parameters

    assert total_parameters(spec_of(name)) == PUBLISHED[name]


@pytest.mark.parametrize("script, yaml", JOBS)
def test_job_layouts_fit_80gb(script, yaml):
    from megatron_tsdkd.planning.memory_plan import load_hf_spec
    from megatron_tsdkd.planning.memory_gate import check_memory_plan

    import math

    from megatron_tsdkd.config import teacher_layout_of
    from megatron_tsdkd.models.builder import padded_vocab_size
    from megatron_tsdkd.planning.run_plan import Layout, teacher_layout

    cfg = config(yaml)
    student = load_hf_spec(cfg.models.student.path, "student")[0]
    teacher = load_hf_spec(cfg.models.teacher.path, "teacher")[0]
    plan = check_memory_plan(cfg, script_world_size(script), student, teacher, gpu_memory_bytes=80 * 1024**3)
    assert plan.fits and plan.inputs.dp >= 1
    assert "FITS" in plan.table()
    # the teacher's own layout obeys the placement rule on the script's nodes of 8 GPUs (what a launch checks)
    vocab = padded_vocab_size(max(student.vocab_size, teacher.vocab_size),
                              math.lcm(cfg.parallel.tensor, teacher_layout_of(cfg.parallel)[0]))
    own = teacher_layout(cfg, Layout(cfg.parallel.tensor, cfg.parallel.pipeline, script_world_size(script),
                                     expert=cfg.parallel.expert), teacher, vocab, ranks_per_node=8)
    assert own is not None and (own.tensor, own.pipeline) == teacher_layout_of(cfg.parallel)
    assert own.expert == cfg.parallel.teacher.expert == plan.inputs.teacher_layout.expert


# ---------------------------------------------------------------------------------------------------------------
# Mixture of experts (Qwen3-MoE): experts per expert-parallel rank, the dispatcher, active parameters, the search

QWEN3 = {"Qwen3-30B-A3B": (30.5e9, 3.3e9), "Qwen3-235B-A22B": (235e9, 22e9),   # model cards: total, active
         "Qwen3-1.7B": (1.7e9, 1.7e9), "Qwen3-8B": (8.2e9, 8.2e9)}


def _qwen3_by_hand(c: dict) -> tuple[int, int]:
    """(total, active) parameters from a config.json's shapes: attention with q/k norms, two norms, the MLP (a MoE
    layer's router and experts, of which top-k per token), embeddings and the final norm."""
    h, d = c["hidden_size"], c["head_dim"]
    attention = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d * h + h * c["num_attention_heads"] * d
    layer = attention + 2 * d + 2 * h
    ends = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + h
    if "num_experts" not in c:
        total = c["num_hidden_layers"] * (layer + 3 * c["intermediate_size"] * h) + ends
        return total, total
    expert, router = 3 * c["moe_intermediate_size"] * h, c["num_experts"] * h
    total = c["num_hidden_layers"] * (layer + router + c["num_experts"] * expert) + ends
    return total, c["num_hidden_layers"] * (layer + router + c["num_experts_per_tok"] * expert) + ends


@pytest.mark.parametrize("name", sorted(QWEN3))
def test_shipped_qwen3_configs_load_and_have_the_published_sizes(name):
    """transformers reads each shipped Qwen3 config.json, arch_spec accepts it, and the plan's total and active
    counts are the shapes' (by hand) and the model cards' to their rounding (1.7B: the tied embedding once)."""
    import json

    from transformers import AutoConfig

    from megatron_tsdkd.models.hf_config import arch_spec
    from megatron_tsdkd.planning.memory_plan import _describe, active_parameters, total_parameters

    spec = arch_spec(AutoConfig.from_pretrained(os.path.join(HF, name), local_files_only=True))
    total, active = _qwen3_by_hand(json.load(open(os.path.join(HF, name, "config.json"))))
    assert (total_parameters(spec), active_parameters(spec)) == (total, active)
    published_total, published_active = QWEN3[name]
    assert abs(total / published_total - 1) < 0.02 and abs(active / published_active - 1) < 0.02
    assert spec.is_moe == (total != active)
    assert (f"{total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active" in _describe(spec)) == spec.is_moe


def test_moe_weights_are_split_per_expert_parallel_rank():
    """Qwen3-30B-A3B over EP ranks: router, attention and embeddings stay whole on every rank, 1/EP of each layer's
    experts remain, so at EP=8 a rank holds exactly 7/8 of the expert weights fewer than at EP=1; as the teacher
    (frozen weights) and as the student, whose gradients follow its weights and whose distributed optimizer state is
    the same at either EP (an expert's state is sharded over the DP / EP ranks that hold it: 1/EP of the experts over
    1/EP of the ranks); without the distributed optimizer it drops by the same 7/8 of the experts."""
    from megatron_tsdkd.planning.memory_plan import PlanInputs, plan_memory

    moe, dense = spec_of("Qwen3-30B-A3B"), spec_of("Qwen3-1.7B")
    experts = 48 * 128 * 3 * 768 * 2048     # every layer's 128 SwiGLU experts, by hand
    fewer = experts * 7 // 8
    base = dict(tp=1, pp=1, world_size=8, micro_batch=1, global_batch=8, seq_len=1024)
    teacher = {ep: plan_memory(dense, moe, PlanInputs(**base, teacher_colocated=False, teacher_ep=ep)) for ep in (1, 8)}
    assert teacher[1].teacher_params[0] - teacher[8].teacher_params[0] == fewer
    assert teacher[1].row("teacher weights").bytes_per_stage[0] - teacher[8].row("teacher weights").bytes_per_stage[0] \
        == 2 * fewer
    assert "teacher TP=1 PP=1 DP=8 EP=8 on its own process groups" in teacher[8].table()

    def row(ep, name, distributed=True):
        plan = plan_memory(moe, None, PlanInputs(**base, ep=ep, distributed_optimizer=distributed))
        return plan.student_params[0] if name == "parameters" else plan.row(name).bytes_per_stage[0]

    assert row(1, "parameters") - row(8, "parameters") == fewer
    assert row(1, "student weights") - row(8, "student weights") == 2 * fewer              # bf16
    assert row(1, "student gradients") - row(8, "student gradients") == 4 * fewer          # fp32 buffer
    assert abs(row(1, "optimizer state") - row(8, "optimizer state")) <= 1                 # ceilings apart
    assert row(1, "optimizer state", False) - row(8, "optimizer state", False) == 12 * fewer
    # co-located, a MoE teacher shares the student's expert groups; at another EP it has groups of its own
    same = PlanInputs(**{**base, "world_size": 16}, ep=8, teacher_ep=8)
    assert not plan_memory(moe, moe, same).teacher_has_own_layout
    assert plan_memory(moe, moe, PlanInputs(**{**same.__dict__, "teacher_ep": 4})).teacher_has_own_layout
    assert not plan_memory(moe, dense, PlanInputs(**{**same.__dict__, "teacher_ep": 1})).teacher_has_own_layout
    assert plan_memory(dense, moe, PlanInputs(**base, teacher_ep=8)).teacher_has_own_layout   # the student's EP: 1


def test_moe_dispatcher_buffers_and_expert_activations():
    """A MoE layer's token dispatcher holds the tokens permuted to their top-k experts going out and coming back
    (tokens x top_k x h each, the activation dtype): in a forward's working set, and kept for backward by a trained
    student with its experts' SwiGLU over the tokens x top_k rows and the router's fp32 scores."""
    from megatron_tsdkd.planning.memory_plan import layer_working_set, mlp_saved_activations

    moe, tokens = spec_of("Qwen3-30B-A3B"), 4096
    dispatcher = 2 * tokens * 8 * 2048 * 2
    assert layer_working_set(moe, 1, tokens, 4, 1024, 2, False) == \
        3 * tokens * 8 * 768 * 2 + dispatcher + 2 * tokens * 2048 * 2
    assert mlp_saved_activations(moe, 1, tokens, 2) == 5 * tokens * 8 * 768 * 2 + 2 * tokens * 128 * 4 + dispatcher
    assert mlp_saved_activations(moe, 2, tokens, 2) - dispatcher - 2 * tokens * 128 * 4 == 5 * tokens * 8 * 384 * 2


def test_experts_not_dividing_by_the_teachers_expert_parallelism_are_refused_naming_the_key(capsys):
    """parallel.teacher.expert must divide the teacher's experts (128) and its data-parallel replicas: tsdkd-plan and
    the start-up gate refuse in one line naming the key."""
    from megatron_tsdkd.commands.plan import main
    from megatron_tsdkd.planning.memory_gate import check_memory_plan

    yaml = os.path.join(ROOT, "configs", "tsdkd_30b_a3b_to_1.7b.yaml")
    sentence = "parallel.teacher.expert: qwen3_moe model: 128 experts are not divisible by expert parallel 3"
    with pytest.raises(SystemExit) as refused:
        main(["--config", yaml, "--world-size", "24", "parallel.teacher.expert=3"])
    assert refused.value.code == 2 and capsys.readouterr().err == f"error: {sentence}\n"
    with pytest.raises(ValueError) as gate:
        check_memory_plan(config("tsdkd_30b_a3b_to_1.7b.yaml", "parallel.teacher.expert=3"), 24,
                          spec_of("Qwen3-1.7B"), spec_of("Qwen3-30B-A3B"), gpu_memory_bytes=80 * 1024**3)
    assert str(gate.value) == sentence
    with pytest.raises(SystemExit):
        main(["--config", yaml, "--world-size", "8", "parallel.teacher.expert=16"])
    err = capsys.readouterr().err
    assert err.startswith("error: parallel.teacher.expert: 16 must divide the teacher's 8 data-parallel replicas") \
        and err.count("\n") == 1, err


def test_layout_search_splits_a_moe_teachers_experts(capsys):
    """tsdkd-plan --search tries a MoE teacher's expert parallelism (powers of two dividing its experts and its
    replicas) with each layout, and prints it in the teacher's column; the shipped 30B-A3B -> 1.7B layout is listed
    with the most replicas and the largest micro-batch; the shipped 235B-A22B -> 8B layout is the best of 2 nodes."""
    from megatron_tsdkd.commands.plan import main
    from megatron_tsdkd.planning.memory_gate import search_for_config

    student, teacher = spec_of("Qwen3-1.7B"), spec_of("Qwen3-30B-A3B")
    cfg = config("tsdkd_30b_a3b_to_1.7b.yaml")
    choices, _ = search_for_config(cfg, 8, student, teacher, 80, ranks_per_node=8)
    for c in choices:
        assert 128 % c.teacher.expert == 0 and c.teacher.data_parallel % c.teacher.expert == 0
        assert c.plan.inputs.teacher_layout.expert == c.teacher.expert and c.student.expert == 1
        assert c.overrides[-1] == f"parallel.teacher.expert={c.teacher.expert}"
    assert {c.teacher.expert for c in choices} == {1, 2, 4, 8}
    # a MoE student: TP=1 only (planning/inputs.py), its experts over 1, 2, 4 or 8 of its replicas
    from megatron_tsdkd.planning.layout_search import candidate_layouts

    pairs = candidate_layouts(teacher, student, 8, 8)
    assert {s.tensor for s, _ in pairs} == {1} and {s.expert for s, _ in pairs} == {1, 2, 4, 8}
    assert all(s.data_parallel % s.expert == 0 and t.expert == 1 for s, t in pairs)
    shipped = next(c for c in choices if c.overrides == ["parallel.tensor=1", "parallel.pipeline=1",
                                                         "parallel.teacher.tensor=1", "parallel.teacher.pipeline=1",
                                                         "parallel.teacher.expert=8"])
    assert (shipped.student.data_parallel, shipped.plan.inputs.micro_batch) == \
        (choices[0].student.data_parallel, choices[0].plan.inputs.micro_batch) == (8, 8)

    yaml = os.path.join(ROOT, "configs", "tsdkd_235b_a22b_to_8b.yaml")
    main(["--config", yaml, "--world-size", "16", "--gpu-memory-gib", "80", "--search"])
    out = capsys.readouterr().out
    assert re.search(r"^  1 +4 x 1 +4 +4 x 2, EP 2 +2 +own, serves 2 replicas +4 +[\d.]+ +[\d.]+$", out, re.M), out
    assert "best: parallel.tensor=4 parallel.pipeline=1 parallel.teacher.tensor=4 parallel.teacher.pipeline=2 " \
           "parallel.teacher.expert=2" in out
    c235 = config("tsdkd_235b_a22b_to_8b.yaml")
    assert (c235.parallel.tensor, c235.parallel.pipeline, c235.parallel.teacher.tensor, c235.parallel.teacher.pipeline,
            c235.parallel.teacher.expert) == (4, 1, 4, 2, 2)


# both models co-located at TP=1 x PP=2 (the shipped config's teacher layout unset)
CO_LOCATED_TP1 = ["parallel.tensor=1", "parallel.pipeline=2", "parallel.teacher.tensor=null",
                  "parallel.teacher.pipeline=null"]
UNSET_TEACHER_LAYOUT = ["parallel.teacher.tensor=null", "parallel.teacher.pipeline=null"]   # for engine=deepspeed


def test_72b_to_7b_refused_at_tp1_naming_the_teacher_weights():
    from megatron_tsdkd.planning.memory_plan import MemoryPlanError
    from megatron_tsdkd.planning.memory_gate import check_memory_plan

    student, teacher = spec_of("Qwen2.5-7B-Instruct"), spec_of("Qwen2.5-72B-Instruct")
    world = script_world_size("tsdkd_70b_to_7b.sh")
    cfg = config("tsdkd_70b_to_7b.yaml", *CO_LOCATED_TP1)
    with pytest.raises(MemoryPlanError) as refused:
        check_memory_plan(cfg, world, student, teacher, gpu_memory_bytes=80 * 1024**3)
    message = str(refused.value)
    assert "DOES NOT FIT" in message and "largest item: teacher weights" in message
    assert "try parallel.tensor=" in message and "memory.enforce=false" in message
    assert "student gradients" in message and "optimizer state" in message  # the table comes with it
    # the suggested layout (the search's best: the student's and the teacher's keys) really fits
    keys = re.search(r"try ((?:parallel\.\S+=\d+ )+)\(", message).group(1).split()
    assert [k.split("=")[0] for k in keys] == ["parallel.tensor", "parallel.pipeline", "parallel.teacher.tensor",
                                               "parallel.teacher.pipeline"], message
    check_memory_plan(config("tsdkd_70b_to_7b.yaml", *CO_LOCATED_TP1, *keys), world, student, teacher,
                      gpu_memory_bytes=80 * 1024**3)
    # the override lets it through
    plan = check_memory_plan(config("tsdkd_70b_to_7b.yaml", *CO_LOCATED_TP1, "memory.enforce=false"), world,
                             student, teacher, gpu_memory_bytes=80 * 1024**3)
    assert not plan.fits and plan.largest_item().name == "teacher weights"


def test_cli_accepts_and_refuses(capsys):
    from megatron_tsdkd.commands.plan import main

    yaml = os.path.join(ROOT, "configs", "tsdkd_70b_to_7b.yaml")
    main(["--config", yaml, "--world-size", "16", "--gpu-memory-gib", "80"])
    out = capsys.readouterr().out
    assert "verdict: FITS" in out and "teacher weights" in out and "configs/hf/Qwen2.5-72B-Instruct" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", yaml, "--world-size", "16", "--gpu-memory-gib", "80", "parallel.tensor=1"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "suggestion: try parallel.tensor=" in out


def test_planner_arithmetic_by_hand():
    """Qwen2.5-7B at TP=4, PP=2, counted by hand from its published shapes."""
    from megatron_tsdkd.planning.memory_plan import stage_parameters

    s = spec_of("Qwen2.5-7B-Instruct")
    h, layers = 3584, 14
    layer = 2 * h + (28 + 8) * 128 // 4 * (h + 1) + h * 28 * 128 // 4 + 3 * 18944 // 4 * h
    embedding = 152064 // 4 * h
    assert stage_parameters(s, 4, 2, 0, 152064) == layers * layer + embedding
    assert stage_parameters(s, 4, 2, 1, 152064) == layers * layer + embedding + h


def test_tied_output_layer_is_a_copy_only_with_pipeline_stages():
    from megatron_tsdkd.planning.memory_plan import stage_parameters

    s = spec_of("Qwen2.5-1.5B-Instruct")
    embedding = 152064 * s.hidden_size // 2
    one_stage = stage_parameters(s, 2, 1, 0, 152064)
    two = [stage_parameters(s, 2, 2, st, 152064) for st in (0, 1)]
    assert sum(two) == one_stage + embedding


# ---------------------------------------------------------------------------------------------------------------
# A teacher with its own layout (parallel.teacher.*): its memory, the layout search, the placement rule's refusals

def _own_plan(student_tp, student_pp, teacher_tp, teacher_pp, **inputs):
    """72B -> 7B on 16 GPUs, on-policy with our decode, at the given layouts."""
    from megatron_tsdkd.planning.memory_plan import PlanInputs, plan_memory

    values = dict(tp=student_tp, pp=student_pp, teacher_tp=teacher_tp, teacher_pp=teacher_pp, world_size=16,
                  micro_batch=2, global_batch=128, seq_len=1024, rollout=True, rollout_len=1024)
    values.update(inputs)
    return plan_memory(spec_of("Qwen2.5-7B-Instruct"), spec_of("Qwen2.5-72B-Instruct"), PlanInputs(**values))


def test_own_teacher_layout_memory():
    """Teacher weights per GPU scale with 1 / (TP_t x PP_t) and leave the output layer out; its copy, V / TP_s rows
    of h_t, sits on the student's last stage with the stashed hidden states (rows x seq x h_t), the hidden states of
    all g served replicas on the teacher's last stage; a column per (student stage, teacher stage) pair."""
    from megatron_tsdkd.planning.memory_plan import stage_parameters, total_parameters

    teacher = spec_of("Qwen2.5-72B-Instruct")
    h_t, bf16 = teacher.hidden_size, 2
    without_head = total_parameters(teacher) - teacher.vocab_size * h_t   # untied: the output layer is its own
    weights = {}
    for tp_t, pp_t in [(8, 1), (8, 2), (4, 4), (2, 8)]:
        plan = _own_plan(2, 1, tp_t, pp_t)
        vocab = plan.padded_vocab
        assert vocab == 152576 if tp_t == 8 else vocab == 152064        # padded for lcm(TP_s, TP_t)
        assert plan.teacher_has_own_layout and plan.columns == [(0, t) for t in range(pp_t)]
        row = plan.row("teacher weights").bytes_per_stage
        for (_, t), count in zip(plan.columns, plan.teacher_params):
            assert count == stage_parameters(teacher, tp_t, pp_t, t, vocab, head=False)
        # every stage's shard, times TP_t: the whole teacher but its output layer (replicated norms aside)
        assert abs(sum(plan.teacher_params) * tp_t - without_head) < 1e-3 * without_head
        last = stage_parameters(teacher, tp_t, pp_t, pp_t - 1, vocab)
        assert plan.teacher_params[-1] == last - vocab // tp_t * h_t
        weights[tp_t, pp_t] = max(row)
        head = plan.row("teacher output layer, re-sharded").bytes_per_stage
        assert head == [vocab // 2 * h_t * bf16] * pp_t      # every GPU is on the student's (only) stage
        rows, g = 128 // 8, tp_t * pp_t // 2                  # a replica's rows per step; replicas served
        served = plan.row("teacher hidden states, all served").bytes_per_stage
        stashed = plan.row("teacher hidden states, stashed").bytes_per_stage
        assert served == [0] * (pp_t - 1) + [g * rows * 1024 * h_t * bf16]
        assert stashed == [rows * 1024 * h_t * bf16] * (pp_t - 1) + [0]   # on the last: a slice of the served
        assert all(r.phase == "train" for r in (plan.row("teacher hidden states, all served"),
                                                plan.row("teacher hidden states, stashed")))
    assert abs(weights[8, 2] / weights[8, 1] - 0.5) < 0.02   # twice the ranks per replica: half the weights
    assert abs(weights[4, 4] / weights[8, 1] - 0.5) < 0.05
    # a student of two stages: the head copy and the stash only where its last stage is
    plan = _own_plan(1, 2, 8, 2)
    assert plan.columns == [(0, 0), (1, 1)]   # rank r: student stage r // 8, teacher stage r mod 16 // 8
    assert plan.row("teacher output layer, re-sharded").bytes_per_stage == [0, plan.padded_vocab * 8192 * 2]
    assert plan.row("teacher hidden states, stashed").bytes_per_stage == [0, 0]   # its last stage is the teacher's
    assert plan.row("teacher hidden states, all served").bytes_per_stage == [0, 8 * 16 * 1024 * 8192 * 2]
    table = plan.table()
    assert "student TP=1 PP=2 DP=8, teacher TP=8 PP=2 DP=1 on its own process groups (serving 8 student " \
           "replicas)" in table and "S1 / T1" in table and re.search(r"worst S\d / T\d at ", table)
    # no teacher activations ride in the student's pipeline: the student's row is the student-only plan's
    from megatron_tsdkd.planning.memory_plan import PlanInputs, plan_memory

    alone = plan_memory(spec_of("Qwen2.5-7B-Instruct"), None, PlanInputs(
        tp=1, pp=2, world_size=16, micro_batch=2, global_batch=128, seq_len=1024, rollout=True, rollout_len=1024))
    assert plan.row("student activations").bytes_per_stage == alone.row("student activations").bytes_per_stage


def test_the_same_layout_is_co_located_and_planned_as_before():
    """parallel.teacher set to the student's own sizes is the co-located plan, row for row (no head copy, no
    handoff); parallel.teacher.colocated=false at that layout plans the teacher's own path."""
    from megatron_tsdkd.planning.memory_plan import PlanInputs, inputs_from_config, plan_memory

    student, teacher = spec_of("Qwen2.5-7B-Instruct"), spec_of("Qwen2.5-72B-Instruct")
    shipped = ["parallel.tensor=4", "parallel.pipeline=2", "batch.micro_size=8"]
    default = inputs_from_config(config("tsdkd_70b_to_7b.yaml", *shipped, *UNSET_TEACHER_LAYOUT), 16)
    same = inputs_from_config(config("tsdkd_70b_to_7b.yaml", *shipped, "parallel.teacher.tensor=4",
                                     "parallel.teacher.pipeline=2"), 16)
    assert default == same and default.teacher_tp is None
    plans = [plan_memory(student, teacher, i) for i in (default, same)]
    assert [(r.name, r.bytes_per_stage) for r in plans[0].rows] == [(r.name, r.bytes_per_stage) for r in plans[1].rows]
    assert not plans[0].teacher_has_own_layout and plans[0].columns == [(0, 0), (1, 1)]
    assert not any(r.name.startswith(("teacher output layer", "teacher hidden states")) for r in plans[0].rows)
    assert round(max(plans[0].peaks) / 1024**3, 1) == 58.7       # README: the co-located 72B -> 7B at micro-batch 8
    own = plan_memory(student, teacher, PlanInputs(**{**default.__dict__, "pp": 1, "teacher_colocated": False}))
    assert own.teacher_has_own_layout and own.row("teacher output layer, re-sharded") and own.columns == [(0, 0)]
    with pytest.raises(ValueError, match=r"^parallel\.teacher: a teacher replica \(4 x 2 = 8 consecutive ranks\)"):
        plan_memory(student, teacher, PlanInputs(**{**default.__dict__, "teacher_colocated": False}))   # DP=2, PP=2


def test_layout_search_order_and_rule(capsys):
    """tsdkd-plan --search: every layout listed fits, splits both models and obeys the placement rule; best first
    (student replicas, then micro-batch, then headroom); the shipped 72B -> 7B config is the best, and today's
    co-located TP=4 x PP=2 is listed below every layout with more replicas."""
    from megatron_tsdkd.commands.plan import main
    from megatron_tsdkd.models.hf_config import check_parallel_layout
    from megatron_tsdkd.planning.layout_search import candidate_layouts
    from megatron_tsdkd.planning.memory_gate import search_for_config
    from megatron_tsdkd.planning.placement import Layout, placement_problem

    student, teacher = spec_of("Qwen2.5-7B-Instruct"), spec_of("Qwen2.5-72B-Instruct")
    cfg = config("tsdkd_70b_to_7b.yaml")
    choices, checked = search_for_config(cfg, 16, student, teacher, 80, ranks_per_node=8)
    assert 1 < len(choices) < checked
    for c in choices:
        assert c.plan.fits and c.plan.inputs.tp == c.student.tensor and c.plan.inputs.pp == c.student.pipeline
        assert c.student.tensor <= 8 and c.teacher.tensor <= 8
        if c.co_located:
            assert c.teacher == c.student
        else:
            assert placement_problem(c.student, c.teacher.tensor, c.teacher.pipeline, 8) is None
        check_parallel_layout(student, c.student.tensor, c.student.pipeline, padded_vocab=c.plan.padded_vocab)
        check_parallel_layout(teacher, c.teacher.tensor, c.teacher.pipeline, padded_vocab=c.plan.padded_vocab)
    keys = [(-c.student.data_parallel, -c.plan.inputs.micro_batch, -(c.plan.headroom // 1024**3)) for c in choices]
    assert keys == sorted(keys)
    best = choices[0]
    assert (best.student, best.teacher) == (Layout(cfg.parallel.tensor, cfg.parallel.pipeline, 16),
                                            Layout(cfg.parallel.teacher.tensor, cfg.parallel.teacher.pipeline, 16))
    assert best.student.data_parallel == 8
    today = next(n for n, c in enumerate(choices) if c.co_located and (c.student.tensor, c.student.pipeline) == (4, 2))
    assert choices[today].student.data_parallel == 2
    assert all(c.student.data_parallel <= 2 for c in choices[today:])   # every layout with more replicas before it
    # a pair that splits a student replica, or a tensor-parallel group wider than a node, is never a candidate
    pairs = candidate_layouts(student, teacher, 16, 4)
    assert all(t.tensor <= 4 and s.tensor <= 4 for s, t in pairs)
    assert (Layout(2, 2, 16), Layout(4, 1, 16)) not in pairs and (Layout(2, 1, 16), Layout(4, 1, 16)) in pairs

    yaml = os.path.join(ROOT, "configs", "tsdkd_70b_to_7b.yaml")
    main(["--config", yaml, "--world-size", "16", "--gpu-memory-gib", "80", "--search"])
    out = capsys.readouterr().out
    assert re.search(r"^  1 +2 x 1 +8 +8 x 2 +1 +own, serves 8 replicas +4 +[\d.]+ +[\d.]+$", out, re.M), out
    assert f"best: {' '.join(best.overrides)}" in out
    with pytest.raises(SystemExit) as none_fits:
        main(["--config", yaml, "--world-size", "16", "--gpu-memory-gib", "16", "--search"])
    assert none_fits.value.code == 1 and "that fit 16 GiB: 0 of the" in capsys.readouterr().out


def test_teacher_layout_refusals_name_parallel_teacher():
    """The run plan refuses a teacher layout that breaks the placement rule or does not split the teacher, in one
    line naming parallel.teacher (planning/run_plan.py teacher_layout)."""
    from megatron_tsdkd.planning.inputs import PreflightError
    from megatron_tsdkd.planning.placement import Layout
    from megatron_tsdkd.planning.run_plan import teacher_layout

    def refusal(student, tp_t, pp_t, ranks_per_node=8, teacher="Qwen2.5-72B-Instruct"):
        cfg = config("tsdkd_70b_to_7b.yaml", f"parallel.tensor={student.tensor}",
                     f"parallel.pipeline={student.pipeline}", f"parallel.teacher.tensor={tp_t}",
                     f"parallel.teacher.pipeline={pp_t}")
        with pytest.raises(PreflightError) as refused:
            teacher_layout(cfg, student, spec_of(teacher), 152576, ranks_per_node)
        message = str(refused.value)
        assert message.startswith("parallel.teacher") and "\n" not in message, message
        return message

    assert refusal(Layout(1, 1, 12), 8, 1) == \
        "parallel.teacher: tensor x pipeline = 8 x 1 = 8 does not divide the 12 processes started"
    split = refusal(Layout(4, 1, 16), 2, 1)
    assert split.startswith("parallel.teacher: a teacher replica (2 x 1 = 2 consecutive ranks) must hold whole "
                            "student replicas (tensor 4 x pipeline 1), but the student replica on ranks [0, 1, 2, 3] "
                            "spans two"), split
    assert "holding every pipeline stage" in refusal(Layout(2, 2, 16), 8, 1)
    assert refusal(Layout(1, 1, 16), 8, 1, ranks_per_node=4) == \
        "parallel.teacher.tensor: 8 must divide the 4 ranks on each node (a tensor-parallel group never spans nodes)"
    heads = refusal(Layout(1, 1, 16), 16, 1, ranks_per_node=16, teacher="Qwen2.5-14B-Instruct")
    assert heads == "parallel.teacher: qwen2 model: 40 attention heads are not divisible by tensor parallel 16", heads
    assert teacher_layout(config("tsdkd_70b_to_7b.yaml", "parallel.teacher.tensor=2", "parallel.teacher.pipeline=1"),
                          Layout(2, 1, 16), spec_of("Qwen2.5-72B-Instruct"), 152576, 8) is None   # co-located


# ---------------------------------------------------------------------------------------------------------------
# Against real megatron models, per rank


def _rank_bytes(model_dirs, dtype_name):
    """Per model: (stage, parameter count, parameter bytes, optimizer state bytes, gradient buffer elements) here."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_tsdkd.config import TrainConfig
    from megatron_tsdkd.models import build_model, read_hf_config
    from megatron_tsdkd.engines.megatron.optim import build_optimizer

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    out = []
    for folder in model_dirs:
        torch.manual_seed(0)
        model = build_model(read_hf_config(folder), params_dtype=dtype)
        params = list(model.parameters())
        count = sum(p.numel() for p in params)
        nbytes = sum(p.numel() * p.element_size() for p in params)
        ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True), module=model)
        grad_elements = sum(buffer.grad_data.numel() for buffer in ddp.buffers)
        cfg = TrainConfig()
        optimizer = build_optimizer(cfg, [ddp], dtype)
        optimizer.step()  # Adam creates its moments on the first step
        state = 0
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):   # DistributedOptimizer(s)
            state += sum(t.numel() * t.element_size() for st in part.optimizer.state.values()
                         for key, t in st.items() if key in ("exp_avg", "exp_avg_sq"))
            masters = [p for group in part.shard_fp32_from_float16_groups for p in group]  # fp32 copies of bf16
            state += sum(p.numel() * p.element_size() for p in masters)
        out.append((ps.get_pipeline_model_parallel_rank(), count, nbytes, state, grad_elements))
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("plan_models")
    return {
        "qwen2_tied": make_tiny_hf_model("qwen2", str(root / "qwen2_tied"), tie=True),
        "llama": make_tiny_hf_model("llama", str(root / "llama"), tie=False),
        "qwen3": make_tiny_hf_model("qwen3", str(root / "qwen3"), tie=False),
    }


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (1, 1)])
def test_per_rank_bytes_match_real_models(tiny_models, tp, pp):
    """World of 2: TP=2 (DP=1), PP=2 (DP=1), DP=2 (optimizer state sharded). Weights and optimizer state exact."""
    from megatron_tsdkd.models import read_hf_config
    from megatron_tsdkd.planning.memory_plan import PlanInputs, arch_spec, plan_memory

    names = sorted(tiny_models)
    world, dp = 2, 2 // (tp * pp)
    ranks = run_parallel(_rank_bytes, [tiny_models[n] for n in names], "bf16", world_size=world, tp=tp, pp=pp)
    for index, name in enumerate(names):
        spec = arch_spec(read_hf_config(tiny_models[name]))
        plan = plan_memory(spec, None, PlanInputs(tp=tp, pp=pp, world_size=world, micro_batch=1, global_batch=2,
                                                  seq_len=16, dtype="bf16", distributed_optimizer=True))
        weights, optimizer, grads = (plan.row(n).bytes_per_stage for n in ("student weights", "optimizer state",
                                                                            "student gradients"))
        optimizer_total = 0
        for rank in ranks:
            stage, count, nbytes, state, grad_elements = rank[index]
            assert count == plan.student_params[stage], (name, tp, pp, stage)
            assert nbytes == weights[stage], (name, tp, pp, stage)
            if dp == 1:
                assert state == optimizer[stage], (name, tp, pp, stage)
            else:  # shards split at bucket boundaries: each near 1/dp of the whole, together exact
                assert abs(state - optimizer[stage]) <= 12 * 128 * dp, (name, state, optimizer[stage])
                optimizer_total += state
            # the fp32 gradient buffer: the planned 4 bytes per parameter, plus megatron's alignment padding
            assert grads[stage] <= 4 * grad_elements <= grads[stage] + 4 * (64 * 32 + 128 * dp)
        if dp > 1:
            unsharded = plan_memory(spec, None, PlanInputs(tp=tp, pp=pp, world_size=1, micro_batch=1, global_batch=2,
                                                           seq_len=16, dtype="bf16"))
            assert optimizer_total == unsharded.row("optimizer state").bytes_per_stage[0]


# ---------------------------------------------------------------------------------------------------------------
# The estimated rows against real allocations: a bf16 student's forward (what autograd saves for backward, its
# logits) and the KV cache megatron's StaticInferenceContext allocates in a generation, at two shapes each, on
# TP=1 and TP=2 (world of 2: TP=1 runs with DP=2).

ESTIMATE_TOLERANCE = 0.15
FORWARD_SHAPES = [(1, 32), (2, 96)]          # (micro-batch, sequence length)
ROLLOUT_SHAPES = [(2, 5, 7), (3, 9, 20)]     # (sequences, prompt length, new tokens)


def _forward_saved_bytes(model, batch: int, seq: int) -> tuple[int, int]:
    """(bytes of the distinct non-parameter storages autograd saves for backward, bytes of the logits) of one
    training-mode forward, as the trainer calls it (token ids, positions, no mask)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(ids, torch.arange(seq).expand(batch, seq), None)
    return sum(saved.values()), logits.numel() * logits.element_size()


def _kv_cache_bytes(model, rows: int, prompt_len: int, new_tokens: int) -> int:
    """Bytes of the key/value buffers of the StaticInferenceContext that generate() fills."""
    from megatron.core.inference import contexts

    from megatron_tsdkd.generation import SamplingConfig, generate

    made = []

    class Recorded(contexts.StaticInferenceContext):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    prompts = [[3 + (r + i) % 200 for i in range(prompt_len)] for r in range(rows)]
    original, contexts.StaticInferenceContext = contexts.StaticInferenceContext, Recorded
    try:
        generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens, greedy=True), eos_token_ids=[299],
                 pad_token_id=0, vocab_size=256)
    finally:
        contexts.StaticInferenceContext = original
    (context,) = made
    return sum(t.untyped_storage().nbytes() for pair in context.key_value_memory_dict.values() for t in pair)


def _measured_allocations(folders: dict) -> dict:
    from megatron_tsdkd.models import build_model, read_hf_config

    out = {}
    for name, folder in folders.items():
        for attention in ("local", "sdpa"):
            torch.manual_seed(0)
            model = build_model(read_hf_config(folder), params_dtype=torch.bfloat16, attention_backend=attention)
            model.train()
            out[name, attention] = {shape: _forward_saved_bytes(model, *shape) for shape in FORWARD_SHAPES}
        model.eval()
        out[name, "kv"] = {shape: _kv_cache_bytes(model, *shape) for shape in ROLLOUT_SHAPES}
    return out


@pytest.fixture(scope="module")
def measured(tiny_models):
    """(tp, model) -> rank 0's measurements; both ranks' must agree (TP shards are equal, DP replicas too)."""
    folders = {name: tiny_models[name] for name in ("llama", "qwen3")}
    out = {}
    for tp in (1, 2):
        ranks = run_parallel(_measured_allocations, folders, world_size=2, tp=tp)
        assert ranks[0] == ranks[1]
        out[tp] = ranks[0]
    return out


def _student_plan(folder, tp, **inputs):
    from megatron_tsdkd.models import read_hf_config
    from megatron_tsdkd.planning.memory_plan import PlanInputs, arch_spec, plan_memory

    spec = arch_spec(read_hf_config(folder))
    values = dict(tp=tp, pp=1, world_size=2, micro_batch=1, global_batch=2, seq_len=16, dtype="bf16")
    values.update(inputs)
    return spec, plan_memory(spec, None, PlanInputs(**values))


def _within(estimate: int, real: int) -> bool:
    return abs(estimate - real) <= ESTIMATE_TOLERANCE * real


@pytest.mark.parametrize("tp", [1, 2])
def test_planned_logits_are_the_real_logits(tiny_models, measured, tp):
    """The planner's per-model logits term (the row grows by it when a teacher is added) against the logits tensor
    of a real forward."""
    from megatron_tsdkd.planning.memory_plan import PlanInputs, plan_memory

    for name in ("llama", "qwen3"):
        for (batch, seq), (_, real) in measured[tp][name, "sdpa"].items():
            spec, plan = _student_plan(tiny_models[name], tp, micro_batch=batch, global_batch=2 * batch // tp,
                                       seq_len=seq)
            with_teacher = plan_memory(spec, spec, plan.inputs)
            row = "logits + loss chunk buffers"
            one_model = with_teacher.row(row).bytes_per_stage[0] - plan.row(row).bytes_per_stage[0]
            print(f"\nlogits {name} TP={tp} b={batch} s={seq}: planned {one_model}, real {real}")
            assert _within(one_model, real), (name, tp, batch, seq, one_model, real)
            assert plan.row(row).bytes_per_stage[0] >= 2 * real   # the logits and their gradient at least


@pytest.mark.parametrize("tp", [1, 2])
def test_planned_kv_cache_is_megatrons_static_context(tiny_models, measured, tp):
    """The rollout KV-cache row against the key/value buffers megatron allocates for a real generation."""
    for name in ("llama", "qwen3"):
        for (rows, prompt_len, new), real in measured[tp][name, "kv"].items():
            dp = 2 // tp
            _, plan = _student_plan(tiny_models[name], tp, global_batch=rows * dp, rollout=True,
                                    rollout_len=prompt_len + new)
            planned = plan.row("student KV cache").bytes_per_stage[0]
            print(f"\nKV cache {name} TP={tp} {rows} x ({prompt_len} + {new}): planned {planned}, real {real}")
            assert _within(planned, real), (name, tp, rows, prompt_len, new, planned, real)


@pytest.mark.parametrize("attention", ["local", "sdpa"])
@pytest.mark.parametrize("tp", [1, 2])
def test_planned_activations_are_what_autograd_saves(tiny_models, measured, tp, attention):
    """The student activations row (recompute none, 1 micro-batch in flight) against the distinct storages a
    real bf16 training forward saves for backward (parameters excluded: they are the weights row)."""
    failures = []
    for name in ("llama", "qwen3"):
        for (batch, seq), (real, _) in measured[tp][name, attention].items():
            _, plan = _student_plan(tiny_models[name], tp, micro_batch=batch, global_batch=2 * batch // tp,
                                    seq_len=seq, attention_scores=attention == "local")
            planned = plan.row("student activations").bytes_per_stage[0]
            print(f"\nactivations {name} TP={tp} {attention} b={batch} s={seq}: planned {planned}, real {real}"
                  f" ({planned / real:.2f})")
            if not _within(planned, real):
                failures.append((name, batch, seq, planned, real))
    assert not failures, f"planned vs saved bytes off by more than {ESTIMATE_TOLERANCE:.0%}: {failures}"


@pytest.mark.parametrize("stage, offload", [(2, False), (2, True), (3, False), (3, True)])
def test_zero_model_states_are_deepspeeds_estimates(stage, offload):
    """engine=deepspeed: the student's model-state rows per GPU equal DeepSpeed's own estimators (bf16)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from megatron_tsdkd.planning.memory_plan import total_parameters
    from megatron_tsdkd.planning.zero_memory_plan import ZeroSettings, largest_block, student_state_bytes

    spec = spec_of("Qwen2.5-7B-Instruct")
    params, block, gpus = total_parameters(spec), largest_block(spec), 8
    assert block == 152064 * 3584   # the embedding outweighs a layer
    ours = sum(student_state_bytes(params, block, gpus, "bf16", ZeroSettings(stage, offload)).values())
    if stage == 2:
        _, expected = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=offload)
    else:
        _, expected, _ = estimate_zero3_model_states_mem_needs(params, block, num_gpus_per_node=gpus,
                                                               cpu_offload=offload, cpu_offload_params=False)
    assert abs(ours - expected) <= 8, (ours, expected)   # integer rounding of the per-GPU shares


def test_zero_plan_verdicts_and_suggestion(capsys):
    """tsdkd-plan engine=deepspeed: 14B -> 1.5B fits one 8-GPU node under ZeRO-3; 72B -> 7B with ZeRO-2 and a full
    teacher copy per GPU does not, and the suggestion (a ZeRO setting or the megatron engine) really fits."""
    from megatron_tsdkd.commands.plan import main
    from megatron_tsdkd.planning.memory_plan import MemoryPlanError
    from megatron_tsdkd.planning.memory_gate import check_memory_plan

    yaml14 = os.path.join(ROOT, "configs", "tsdkd_14b_to_1.5b.yaml")
    main(["--config", yaml14, "--world-size", "8", "--gpu-memory-gib", "80", "engine=deepspeed",
          *UNSET_TEACHER_LAYOUT])
    out = capsys.readouterr().out
    assert "verdict: FITS" in out and "DeepSpeed ZeRO-3 over 8 GPUs" in out and "gathered largest block" in out
    student, teacher = spec_of("Qwen2.5-7B-Instruct"), spec_of("Qwen2.5-72B-Instruct")
    bad = ["engine=deepspeed", "parallel.tensor=1", "parallel.pipeline=1", *UNSET_TEACHER_LAYOUT,
           "deepspeed.zero_stage=2", "deepspeed.teacher_zero3_inference=false"]
    with pytest.raises(MemoryPlanError) as refused:
        check_memory_plan(config("tsdkd_70b_to_7b.yaml", *bad), 8, student, teacher, gpu_memory_bytes=80 * 1024**3)
    message = str(refused.value)
    assert "DOES NOT FIT" in message and "largest item: teacher weights" in message and "ZeRO-2" in message
    suggestion = re.search(r"try (deepspeed\.\S+(?: \S+=\S+)*) \(peak", message)
    assert suggestion, message
    keys = [k for k in suggestion.group(1).split() if "=" in k]
    plan = check_memory_plan(config("tsdkd_70b_to_7b.yaml", *bad, *keys), 8, student, teacher,
                             gpu_memory_bytes=80 * 1024**3)
    assert plan.fits


def _qwen25_05b():
    """Qwen2.5-0.5B-Instruct's published config (tied embeddings), the student of the pair issue 31 ran."""
    from transformers import Qwen2Config

    from megatron_tsdkd.models.hf_config import arch_spec

    return arch_spec(Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                                 max_position_embeddings=32768, rope_theta=1e6))


CPU_PAIR = ["batch.global_size=4", "batch.micro_size=2", "data.max_length=1024", "data.max_prompt_length=512",
            "rollout.max_new_tokens=512", "memory.host_memory_gib=24"]


def test_host_plan_refuses_a_cpu_run_that_outgrows_the_node_and_says_what_to_change():
    """The 1.5B -> 0.5B pair on 2 CPU processes of a 24 GiB machine (issue 31: fp32 with vLLM was OOM-killed after a
    GPU verdict of FITS): fp32 + vLLM and fp32 alone do not fit, the refusal names the figure and the settings that
    help; bf16 with our decode fits. Per rank: the whole device plan (no CUDA reserve) plus the replica's copy."""
    from megatron_tsdkd.planning.host_memory_plan import PROCESS_BYTES, node_facts
    from megatron_tsdkd.planning.memory_plan import MemoryPlanError
    from megatron_tsdkd.planning.memory_gate import check_memory_plan

    student, teacher = _qwen25_05b(), spec_of("Qwen2.5-1.5B-Instruct")
    node = node_facts(2, True, 24)

    def plan(*extra):
        return check_memory_plan(config("demo_cpu.yaml", *CPU_PAIR, *extra), 2, student, teacher, None, node)

    with pytest.raises(MemoryPlanError) as refused:
        plan("precision.dtype=fp32", "rollout.engine=vllm")
    first = str(refused.value).splitlines()[0]
    assert re.match(r"host memory: 2 ranks on this node need 3\d\.\d GiB \(1\d\.\d GiB each\) but 24\.0 GiB is "
                    r"available \(memory\.host_memory_gib\); try precision\.dtype=bf16", first), first
    assert "rollout.engine=megatron" in first and "fewer processes per node (now 2)" in first
    assert "host verdict: DOES NOT FIT" in str(refused.value)   # the table follows the line
    with pytest.raises(MemoryPlanError, match="^host memory: "):
        plan("precision.dtype=fp32", "rollout.engine=megatron")
    fits = plan("precision.dtype=bf16", "rollout.engine=megatron")
    host = fits.host
    assert host.fits and host.on_host and host.ranks == 2 and "host verdict: FITS" in fits.table()
    rows = dict(host.rows)
    device = max(fits.peaks) - 3 * 1024**3          # the device plan without its CUDA reserve, on the host
    assert rows["the device plan, held on the host (no CUDA reserve)"] == device
    assert rows["Python process and libraries"] == PROCESS_BYTES
    with_vllm = plan("precision.dtype=bf16", "rollout.engine=vllm", "memory.enforce=false").host
    replica = dict(with_vllm.rows)["vLLM replica: weights (TP=1) + KV cache + engine"]
    from megatron_tsdkd.planning.memory_plan import total_parameters
    assert replica > total_parameters(student) * 2   # the student's bf16 weights at TP=1, and more


def test_host_plan_of_gpu_nodes_counts_loading_and_async_staging(capsys):
    """A GPU node holds per rank the process, the loading buffers and (async_save) its checkpoint shard; tsdkd-plan
    prints the node's plan with --host-memory-gib and fails (exit 1) when 8 ranks outgrow it."""
    from megatron_tsdkd.commands.plan import main
    from megatron_tsdkd.planning.host_memory_plan import node_facts
    from megatron_tsdkd.planning.memory_gate import check_memory_plan

    student, teacher = spec_of("Qwen2.5-7B-Instruct"), spec_of("Qwen2.5-72B-Instruct")
    plan = check_memory_plan(config("tsdkd_70b_to_7b.yaml"), 16, student, teacher, 80 * 1024**3,
                             node_facts(8, False, 1024))
    rows = dict(plan.host.rows)
    assert not plan.host.on_host and plan.host.fits
    assert set(rows) == {"Python process and libraries", "loading (largest tensor read and assembled)",
                         "async checkpoint staging (checkpoint.async_save)"}
    staged = max(plan.row("student weights").bytes_per_stage[s] + plan.row("optimizer state").bytes_per_stage[s]
                 for s in range(plan.inputs.pp))
    assert rows["async checkpoint staging (checkpoint.async_save)"] == staged
    sync = check_memory_plan(config("tsdkd_70b_to_7b.yaml", "checkpoint.async_save=false"), 16, student, teacher,
                             80 * 1024**3, node_facts(8, False, 1024))
    assert "async checkpoint staging (checkpoint.async_save)" not in dict(sync.host.rows)
    yaml = os.path.join(ROOT, "configs", "tsdkd_70b_to_7b.yaml")
    main(["--config", yaml, "--world-size", "16", "--host-memory-gib", "1024"])
    assert "host verdict: FITS, 8 ranks x" in capsys.readouterr().out
    with pytest.raises(SystemExit) as failed:
        main(["--config", yaml, "--world-size", "16", "--host-memory-gib", "16"])
    out = capsys.readouterr().out
    assert failed.value.code == 1 and "host verdict: DOES NOT FIT, 8 ranks x" in out
    assert "suggestion (host): " in out and "fewer processes per node (now 8)" in out


@pytest.mark.parametrize("script, yaml", JOBS)
def test_micro_size_auto_picks_the_largest_that_fits_and_the_rollout_boundary(script, yaml):
    """batch.micro_size=auto (the shipped large configs): the plan's largest fitting micro-batch, > 1, and the next
    candidate up does not fit. At the training -> rollout boundary the training step's cached blocks are returned
    (generation/vllm_replica.py), so what is held across it is the static memory: the peak is static + the larger of
    the step and the replica's share, and each phase fits on its own."""
    from megatron_tsdkd.planning.memory_plan import load_hf_spec
    from megatron_tsdkd.planning.memory_gate import check_memory_plan, micro_batch_candidates

    cfg = config(yaml)
    assert cfg.batch.micro_size == "auto" and cfg.batch.sort_by_length
    student = load_hf_spec(cfg.models.student.path, "student")[0]
    teacher = load_hf_spec(cfg.models.teacher.path, "teacher")[0]
    world = script_world_size(script)
    plan = check_memory_plan(cfg, world, student, teacher, gpu_memory_bytes=80 * 1024**3)
    chosen = plan.inputs.micro_batch
    candidates = micro_batch_candidates(cfg, world)
    assert chosen > 1 and chosen in candidates and plan.fits
    bigger = [b for b in candidates if b > chosen]
    if bigger:
        too_big = check_memory_plan(config(yaml, f"batch.micro_size={min(bigger)}", "memory.enforce=false"), world,
                                    student, teacher, gpu_memory_bytes=80 * 1024**3)
        assert not too_big.fits
    worst = plan.worst_stage
    phase = {p: sum(r.bytes_per_stage[worst] for r in plan.rows if r.phase == p) for p in ("static", "train", "rollout")}
    assert plan.row("vLLM replica: weights").phase == "rollout"   # the shipped engine: auto plans the replica
    assert plan.peak(worst) == phase["static"] + max(phase["train"], phase["rollout"])
    assert phase["static"] + phase["train"] <= plan.capacity and phase["static"] + phase["rollout"] <= plan.capacity
    print(f"{yaml}: micro-batch {chosen}; held across the boundary {phase['static'] / 1024**3:.1f} GiB, training "
          f"{phase['train'] / 1024**3:.1f}, rollout {phase['rollout'] / 1024**3:.1f}, peak {plan.peak(worst) / 1024**3:.1f}")


def test_replica_returns_the_cached_blocks_at_the_boundary(monkeypatch):
    """Sleep mode (GPU): after vLLM's sleep and before its wake-up the caching allocator's free blocks go back to
    the device, in that order; without sleep mode (CPU) nothing happens."""
    from megatron_tsdkd.generation import vllm_replica

    calls = []
    monkeypatch.setattr(vllm_replica, "release_cached_memory", lambda: calls.append("release"))

    class Engine:
        def sleep(self, level):
            calls.append(f"sleep{level}")

        def wake_up(self):
            calls.append("wake_up")

    replica = vllm_replica.VllmReplica.__new__(vllm_replica.VllmReplica)
    replica.llm, replica.asleep, replica.options = Engine(), False, {"enable_sleep_mode": True}
    replica.sleep()
    replica.wake_up()
    replica.wake_up()   # awake already: nothing
    assert calls == ["sleep2", "release", "release", "wake_up"]
    calls.clear()
    replica.options = {"enable_sleep_mode": False}
    replica.sleep()
    replica.wake_up()
    assert calls == []


def test_host_plan_of_the_deepspeed_engine_counts_its_loading_and_offloaded_state():
    """engine=deepspeed: the loading row is the engine's own (partitioned under ZeRO-3: one tensor; ZeRO-2: the
    fp32 student on every rank), and ZeRO-Offload's optimizer state is on the host."""
    from megatron_tsdkd.planning.host_memory_plan import node_facts
    from megatron_tsdkd.planning.memory_plan import total_parameters
    from megatron_tsdkd.planning.memory_gate import check_memory_plan

    student, teacher = spec_of("Qwen2.5-1.5B-Instruct"), spec_of("Qwen2.5-14B-Instruct")
    base = ["engine=deepspeed", "parallel.tensor=1", "parallel.pipeline=1", *UNSET_TEACHER_LAYOUT,
            "memory.enforce=false"]

    def rows(*extra):
        plan = check_memory_plan(config("tsdkd_14b_to_1.5b.yaml", *base, *extra), 8, student, teacher,
                                 80 * 1024**3, node_facts(8, False, 1024))
        return dict(plan.host.rows)

    zero3, zero2 = rows("deepspeed.zero_stage=3"), rows("deepspeed.zero_stage=2")
    from megatron_tsdkd.planning.zero_memory_plan import largest_tensor

    assert zero2["loading (engine)"] == 4 * total_parameters(student)                 # every rank: the fp32 student
    assert zero3["loading (engine)"] == 4 * max(largest_tensor(student), largest_tensor(teacher))   # one tensor
    assert "optimizer state offloaded to the host (deepspeed.offload_optimizer)" not in zero3
    offloaded = rows("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu")
    assert offloaded["optimizer state offloaded to the host (deepspeed.offload_optimizer)"] == \
        -(-16 * total_parameters(student) // 8)   # fp32 master + Adam moments + fp32 gradients, over 8 ranks
    assert "async checkpoint staging (checkpoint.async_save)" not in zero3   # DeepSpeed saves synchronously


def stand_in_model(name: str, out) -> str:
    """The published config of ``name`` (configs/hf/) beside a safetensors file of its exact tensor shapes whose data
    is a hole (a sparse file: the header is checked, no byte of weights is written or read) and the demo tokenizer:
    what a dry run reads of a model folder, without the model."""
    import json
    import shutil
    import struct

    from transformers import AutoConfig, AutoTokenizer

    from megatron_tsdkd.models.hf_config import arch_spec
    from megatron_tsdkd.models.mapping import hf_tensor_shapes

    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(HF, name, "config.json"), out)
    header, offset = {}, 0
    for tensor, shape in sorted(hf_tensor_shapes(arch_spec(AutoConfig.from_pretrained(out))).items()):
        size = 2 * math.prod(shape)
        header[tensor] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = os.path.join(out, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
    os.truncate(path, 8 + len(blob) + offset)
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "megatron_tsdkd", "assets", "demo", "teacher")).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("script, yaml", [job for job in JOBS if "_a3b_" in job[1] or "_a22b_" in job[1]])
def test_shipped_moe_jobs_pass_the_dry_run(script, yaml, tmp_path, monkeypatch, capsys):
    """tsdkd-train --dry-run of each shipped mixture-of-experts job at its script's world, on stand-ins of the
    published models (the dry run checks the weight files' tensors against the configs, plans and prints; nothing
    is built). On this CPU machine the models would count in host memory: the node's is given as a GPU node's."""
    from megatron_tsdkd.commands.train import dry_run

    cfg = config(yaml)
    paths = {role: stand_in_model(os.path.basename(getattr(cfg.models, role).path), tmp_path / role)
             for role in ("teacher", "student")}
    monkeypatch.setenv("WORLD_SIZE", str(script_world_size(script)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    capsys.readouterr()
    dry_run(config(yaml, f"models.teacher.path={paths['teacher']}", f"models.student.path={paths['student']}",
                   f"data.train={ROOT}/megatron_tsdkd/assets/demo/data/train.jsonl", f"checkpoint.dir={tmp_path}/ck",
                   f"logging.dir={tmp_path}/tb", "memory.host_memory_gib=2048", "rollout.engine=megatron"))
    out = capsys.readouterr().out
    assert "for %d processes are fine" % script_world_size(script) in out, out[-3000:]
    assert f"EP={cfg.parallel.teacher.expert} on its own process groups" in out and "verdict: FITS" in out
