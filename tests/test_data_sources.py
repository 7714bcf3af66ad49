"""Data as users have it: JSONL(.gz), parquet shards, Arrow, save_to_disk folders, column mapping, one-line errors;
the tokenise-once cache (built once, rebuilt on change, never used half-written, one builder while others wait);
length-grouped sampling that resumes exactly; tsdkd-data inspect."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_tsdkd.data import ChatTemplateTokenizer, DataFormatError, DistributedBatchSampler, load_chat_dataset
from megatron_tsdkd.data import token_cache
from megatron_tsdkd.data.records import Fields, read_jsonl
from test_train import overrides, workdir  # noqa: F401  (tiny models sharing the demo tokenizer, and a JSONL)

ROWS = [{"prompt": "What is 2+2?", "response": "It is 4.", "answer": "4"},
        {"prompt": "Name a colour.", "response": "Blue, the colour of the sky on a clear day.", "answer": None},
        {"prompt": "A much longer question about the sum of the first ten integers?", "response": "55", "answer": "55"},
        {"prompt": "Say hi", "response": "hi", "answer": "x"},
        {"prompt": "Count to three", "response": "one two three", "answer": "3"},
        {"prompt": "q6", "response": "r6 is a fairly long answer " * 3, "answer": "6"},
        {"prompt": "q7", "response": "r7", "answer": None}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny_models import make_tokenizer
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _jsonl(path, rows, opener=open):
    with opener(path, "wt") as handle:
        for row in rows:
            handle.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    return str(path)


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def _saved(path, rows):
    import datasets
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def _tokens(dataset):
    return [(e.prompt_ids, e.response_ids, e.answer) for e in dataset.examples]


def test_every_format_gives_the_same_tokens_in_memory_and_cached(tok, tmp_path):
    reference_path = _jsonl(tmp_path / "d.jsonl", ROWS)
    chat = ChatTemplateTokenizer(tok)   # today's path, one row at a time
    reference = [(e.prompt_ids, e.response_ids, e.answer) for e in map(chat.encode_record, read_jsonl(reference_path))]
    shards = tmp_path / "shards" / "data"
    shards.mkdir(parents=True)
    _parquet(shards / "train-00001-of-00002.parquet", ROWS[3:])
    _parquet(shards / "train-00000-of-00002.parquet", ROWS[:3])
    saved = _saved(tmp_path / "saved", ROWS)
    arrow = tmp_path / "one.arrow"
    shutil.copy(next(os.path.join(saved, f) for f in os.listdir(saved) if f.endswith(".arrow")), arrow)
    paths = [reference_path, _jsonl(tmp_path / "d.jsonl.gz", ROWS, gzip.open), str(tmp_path / "shards"),
             _parquet(tmp_path / "one.parquet", ROWS), str(arrow), saved]
    for path in paths:
        for cache_dir in (None, str(tmp_path / "cache")):
            data = load_chat_dataset(path, tok, max_length=512, max_prompt_length=256, cache_dir=cache_dir)
            assert _tokens(data) == reference, (path, cache_dir)
    cached = load_chat_dataset(str(tmp_path / "shards"), tok, cache_dir=str(tmp_path / "cache"))
    assert [e.source for e in cached.examples][2:4] == [f"{shards}/train-00000-of-00002.parquet:3",
                                                        f"{shards}/train-00001-of-00002.parquet:1"]
    assert list(cached.lengths()) == [len(p) + len(r) for p, r, _ in reference]


def test_column_mapping_reads_a_data_sets_own_columns(tok, tmp_path):
    reference = load_chat_dataset(_jsonl(tmp_path / "d.jsonl", ROWS), tok)
    renamed = [{"question": r["prompt"], "solution": r["response"], "final": r["answer"]} for r in ROWS]
    fields = Fields(prompt="question", response="solution", answer="final")
    mapped = load_chat_dataset(_parquet(tmp_path / "m.parquet", renamed), tok, fields=fields)
    assert _tokens(mapped) == _tokens(reference)
    chats = [{"conversation": [{"role": "user", "content": r["prompt"]},
                               {"role": "assistant", "content": r["response"]}]} for r in ROWS]
    chat_data = load_chat_dataset(_parquet(tmp_path / "c.parquet", chats), tok, fields=Fields(messages="conversation"))
    assert [e[:2] for e in _tokens(chat_data)] == [e[:2] for e in _tokens(reference)]
    with pytest.raises(ValueError, match="the columns must differ"):
        Fields(prompt="response")


def _bad_inputs(tmp_path):
    good = _parquet(tmp_path / "good.parquet", ROWS[:2])
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(good, shards / "a.parquet")
    (shards / "b.parquet").write_bytes(b"PAR1 not really parquet")
    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"prompt": "q", "response": "a"}\n' * 50)[:-12])   # its end cut off
    return [
        (good, Fields(prompt="question"), f"{good}:1: missing column 'question' (data.fields.prompt); the row has "
                                          f"columns ['answer', 'prompt', 'response']"),
        (_parquet(tmp_path / "t.parquet", [{"prompt": 3, "response": "a"}]), Fields(),
         f"{tmp_path}/t.parquet:1: column 'prompt' (data.fields.prompt) must be a string, got int"),
        (_parquet(tmp_path / "e.parquet", [ROWS[0], {"prompt": "q", "response": " ", "answer": None}]), Fields(),
         f"{tmp_path}/e.parquet:2: column 'response' (data.fields.response) is empty"),
        (str(shards), Fields(), f"{shards}/b.parquet: cannot read this parquet shard (ArrowInvalid: "),
        (str(gz), Fields(), f"{gz}:4"),   # the line where the stream breaks (40-something): "cannot read the file"
        (str(tmp_path / "x.csv"), Fields(), f"{tmp_path}/x.csv: unknown data file type; expected JSONL"),
    ]


def test_bad_inputs_stop_with_one_line_naming_file_row_and_column(tok, tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    for path, fields, expected in _bad_inputs(tmp_path):
        for cache_dir in (None, str(tmp_path / "cache")):
            with pytest.raises((DataFormatError, ValueError)) as error:
                load_chat_dataset(path, tok, fields=fields, cache_dir=cache_dir)
            message = str(error.value)
            assert "\n" not in message and message.startswith(expected), (message, expected)
            assert "cannot read the file (Compressed file ended" in message or not path.endswith(".gz")
    assert not [n for n in os.listdir(tmp_path / "cache") if ".building-" in n]   # failed builds leave nothing


def _count_builds(monkeypatch):
    builds = []
    real = token_cache._build
    monkeypatch.setattr(token_cache, "_build", lambda *a, **k: builds.append(a[0]) or real(*a, **k))
    return builds


def test_cache_is_built_once_and_rebuilt_when_data_tokenizer_or_template_change(tok, tmp_path, monkeypatch):
    from tiny_models import make_tokenizer

    assert token_cache.resolve_cache_dir("auto", "outputs/tensorboard") == "outputs/data_cache"   # data.cache_dir
    assert token_cache.resolve_cache_dir("none", "x") is None and token_cache.resolve_cache_dir("/c", "x") == "/c"
    builds = _count_builds(monkeypatch)
    cache = str(tmp_path / "cache")
    path = _parquet(tmp_path / "d.parquet", ROWS)
    t0 = time.perf_counter()
    first = load_chat_dataset(path, tok, cache_dir=cache)
    t1 = time.perf_counter()
    again = load_chat_dataset(path, tok, cache_dir=cache)
    t2 = time.perf_counter()
    assert len(builds) == 1 and _tokens(again) == _tokens(first)
    print(f"first start {t1 - t0:.3f} s, cached start {t2 - t1:.3f} s")
    templated = make_tokenizer(str(tmp_path / "tok2"))
    templated.chat_template = templated.chat_template.replace("<|im_start|>", "<|im_start|> ")
    load_chat_dataset(path, templated, cache_dir=cache)
    assert len(builds) == 2                                          # another chat template
    other = make_tokenizer(str(tmp_path / "tok3"))
    other.add_tokens(["What"])
    changed = load_chat_dataset(path, other, cache_dir=cache)
    assert len(builds) == 3 and _tokens(changed) != _tokens(first)   # another tokenizer
    _parquet(tmp_path / "d.parquet", ROWS[::-1])
    reread = load_chat_dataset(path, tok, cache_dir=cache)
    assert len(builds) == 4 and _tokens(reread) == _tokens(first)[::-1]   # the file changed
    load_chat_dataset(path, tok, cache_dir=cache, max_length=300)
    load_chat_dataset(path, tok, cache_dir=cache, mode="on_policy")
    assert len(builds) == 6
    load_chat_dataset(path, tok, cache_dir=cache)
    assert len(builds) == 6
    folder = load_chat_dataset(path, tok, cache_dir=cache).folder
    os.remove(os.path.join(folder, "meta.json"))                    # incomplete: never used, rebuilt
    assert _tokens(load_chat_dataset(path, tok, cache_dir=cache)) == _tokens(reread) and len(builds) == 7
    with open(os.path.join(folder, "tokens.bin"), "r+b") as handle:  # truncated: never used, rebuilt
        handle.truncate(os.path.getsize(handle.name) - 8)
    assert _tokens(load_chat_dataset(path, tok, cache_dir=cache)) == _tokens(reread) and len(builds) == 8


CHILD = r"""
import json, logging, os, sys, threading
from transformers import AutoTokenizer
from megatron_tsdkd.data import ChatTemplateTokenizer, token_cache
from megatron_tsdkd.data.records import Fields
from megatron_tsdkd.data.sources import resolve_source
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
role, data, cache, tok, sync = sys.argv[1:6]
built = []
real = token_cache._build
token_cache._build = lambda *a, **k: built.append(1) or real(*a, **k)
def pause(rows):   # the builder says it has written a chunk, then stops there until killed
    if role == "builder":
        open(sync, "w").close()
        threading.Event().wait()
dataset = token_cache.cached_dataset(resolve_source(data), ChatTemplateTokenizer(AutoTokenizer.from_pretrained(tok)),
                                     "off_policy", 512, 256, Fields(), cache, on_progress=pause)
print(json.dumps({"built": len(built), "tokens": [int(x) for x in dataset.tokens[:50]], "n": len(dataset)}))
"""


def _wait_for(predicate, what, deadline_s=240.0):
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killed_builder_leaves_nothing_used_and_a_waiting_rank_builds_instead(tok, tmp_path):
    """Three processes, no process group: the first builds and is killed (-9) after its first chunk; the two others
    waited on the lock; one of them builds the set again, the other waits for it and reads it."""
    from megatron_tsdkd.data.chat_dataset import CHUNK_ROWS

    data = _jsonl(tmp_path / "d.jsonl", [ROWS[i % len(ROWS)] for i in range(CHUNK_ROWS + 40)])
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    cache, sync = str(tmp_path / "cache"), str(tmp_path / "builder-paused")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__))] + sys.path))

    def start(role, log):
        return subprocess.Popen([sys.executable, "-c", CHILD, role, data, cache, tok_dir, sync], env=env,
                                stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)

    builder = start("builder", tmp_path / "builder.log")
    _wait_for(lambda: os.path.exists(sync), "the builder's first chunk")
    waiters = [start("waiter", tmp_path / f"waiter{i}.log") for i in range(2)]
    _wait_for(lambda: all("waiting for another process" in (tmp_path / f"waiter{i}.log").read_text()
                          for i in range(2)), "both waiters on the lock")
    assert [n for n in os.listdir(cache) if ".building-" in n]       # half-written, under its temporary name
    builder.kill()                                                   # SIGKILL
    builder.wait()
    assert builder.returncode == -signal.SIGKILL
    results = [json.loads(w.communicate(timeout=240)[0].strip().splitlines()[-1]) for w in waiters]
    assert sorted(r["built"] for r in results) == [0, 1]
    expected = load_chat_dataset(data, tok)
    flat = [t for e in expected.examples for t in e.prompt_ids + e.response_ids][:50]
    assert all(r["tokens"] == flat and r["n"] == len(expected) for r in results)
    assert not [n for n in os.listdir(cache) if ".building-" in n]   # the killed build's leftovers are gone


def test_length_grouped_sampler_pads_less_covers_each_epoch_and_resumes_exactly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 1000, size=403)
    kwargs = dict(num_examples=403, global_batch_size=16, dp_size=2, seed=5, lengths=lengths, group_batches=8)
    plain = DistributedBatchSampler(403, 16, dp_size=2, seed=5)
    grouped = [DistributedBatchSampler(dp_rank=r, **kwargs) for r in range(2)]

    def padded(order):   # tokens of each rank's share padded to its longest row
        shares = order.reshape(-1, 8)
        return int(sum(len(s) * lengths[s].max() for s in shares))

    kept = plain.batches_per_epoch * 16
    assert sorted(grouped[0].global_order(0)) == sorted(plain.global_order(0)[:kept])   # same examples, same tail out
    assert padded(grouped[0].global_order(0)) < 0.8 * padded(plain.global_order(0)[:kept])
    assert not np.array_equal(grouped[0].global_order(0), grouped[0].global_order(1))   # epochs differ
    first = [[g.next_batch() for g in grouped] for _ in range(40)]                 # crosses an epoch boundary
    for step in first:
        assert not set(step[0]) & set(step[1]) and len(step[0]) == 8
    again = DistributedBatchSampler(dp_rank=1, **kwargs)
    assert [again.next_batch() for _ in range(40)] == [s[1] for s in first]
    resumed = DistributedBatchSampler(dp_rank=1, **kwargs)
    interrupted = DistributedBatchSampler(dp_rank=1, **kwargs)
    for _ in range(30):
        interrupted.next_batch()
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    assert [resumed.next_batch() for _ in range(10)] == [s[1] for s in first[30:40]]
    other = DistributedBatchSampler(dp_rank=1, **dict(kwargs, lengths=lengths[::-1].copy()))
    with pytest.raises(ValueError, match="grouped examples by other lengths"):
        other.load_state_dict(interrupted.state_dict())
    assert DistributedBatchSampler(dp_rank=1, **dict(kwargs, seed=6)).next_batch() != first[0][1]


def test_resume_after_a_cache_rebuild_draws_the_same_examples(tok, tmp_path, monkeypatch):
    builds = _count_builds(monkeypatch)
    rows = [{"prompt": f"question {i} " * (1 + i % 5), "response": "answer " * (1 + (7 * i) % 11)} for i in range(60)]
    path, cache = _parquet(tmp_path / "d.parquet", rows), str(tmp_path / "cache")
    data = load_chat_dataset(path, tok, cache_dir=cache)
    sampler = DistributedBatchSampler(len(data), 8, seed=1, lengths=data.lengths(), group_batches=2)
    run = [[data[i] for i in sampler.next_batch()] for _ in range(12)]
    replay = DistributedBatchSampler(len(data), 8, seed=1, lengths=data.lengths(), group_batches=2)
    [replay.next_batch() for _ in range(5)]
    state = replay.state_dict()
    _parquet(tmp_path / "d.parquet", rows)                      # the same rows written again: a new file
    rebuilt = load_chat_dataset(path, tok, cache_dir=cache)
    assert len(builds) == 2 and rebuilt.folder != data.folder
    resumed = DistributedBatchSampler(len(rebuilt), 8, seed=1, lengths=rebuilt.lengths(), group_batches=2)
    resumed.load_state_dict(state)
    after = [[rebuilt[i] for i in resumed.next_batch()] for _ in range(7)]
    from megatron_tsdkd.config import DataConfig
    from megatron_tsdkd.data import training_sampler
    configured = training_sampler(rebuilt, DataConfig(group_by_length=True), 8, 0, 1, seed=1)   # the run's sampler
    assert np.array_equal(configured.lengths, rebuilt.lengths()) and configured.shuffle
    assert training_sampler(rebuilt, DataConfig(), 8, 0, 1, seed=1).lengths is None
    assert [[(e.prompt_ids, e.response_ids) for e in b] for b in after] == \
        [[(e.prompt_ids, e.response_ids) for e in b] for b in run[5:]]


def test_inspect_reports_rows_columns_lengths_and_drops(tok, tmp_path, capsys):
    from megatron_tsdkd.commands.data import main

    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    renamed = [{"question": r["prompt"], "solution": r["response"]} for r in ROWS]
    path = _parquet(tmp_path / "m.parquet", renamed)
    main(["inspect", path, "--tokenizer", tok_dir, "data.fields.prompt=question", "data.fields.response=solution",
          "data.max_length=80", "data.max_prompt_length=40", f"data.cache_dir={tmp_path}/cache",
          "--png", str(tmp_path / "h.png")])
    out = capsys.readouterr().out
    data = load_chat_dataset(path, tok, max_length=80, max_prompt_length=40,
                             fields=Fields(prompt="question", response="solution"))
    stats = data.stats
    assert f"{len(ROWS)} rows read, {stats.kept} kept (off_policy)" in out
    assert "columns in the data: question, solution" in out
    assert "prompt <- 'question' (data.fields.prompt), response <- 'solution' (data.fields.response)" in out
    assert stats.dropped_long_prompt == 1 and f"dropped: 1 row whose prompt alone is longer" in out
    assert f"e.g. {path}:3" in out
    assert f"truncated: {stats.truncated_response} response" in out and stats.truncated_response >= 1
    prompt = data.prompt_lengths()
    assert f"prompt tokens: min {prompt.min()}," in out and f"max {prompt.max()}" in out
    bars = [line for line in out.splitlines() if line.startswith("  ") and "-" in line]
    assert sum(int(line.split()[-1]) for line in bars) == 2 * stats.kept      # prompt + response histograms
    assert "memory-mapped" in out
    with pytest.raises(SystemExit):
        main(["inspect", path])                                  # no tokenizer, no config


def test_data_keys_are_typed_and_validated_in_one_line():
    from megatron_tsdkd.config import ConfigError, load_config

    base = ["models.student.path=s", "models.teacher.path=t", "data.train=d"]
    cfg = load_config(None, base + ["data.fields.prompt=question", "data.group_by_length=true"])
    assert cfg.data.fields == Fields(prompt="question") and cfg.data.group_by_length and cfg.data.cache_dir == "auto"
    for override, message in [("data.fields.answer=", "data.fields.answer: must name a column, got ''"),
                              ("data.fields.prompt=response", "data.fields.prompt: the columns must differ"),
                              ("data.fields.question=q", "data.fields.question: unknown key"),
                              ("data.group_by_length=3", "data.group_by_length: expected true or false, got 3")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + [override])


def test_preflight_reads_mapped_parquet_through_the_cache_and_names_the_key(workdir, tmp_path):
    """check_inputs (no process group): a parquet folder with its own column names gives the JSONL's tokens, from a
    cache beside logging.dir; a bad row and an unusable data.cache_dir are one line naming the key."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.planning.inputs import PreflightError, check_inputs

    root = workdir
    rows = [json.loads(line) for line in open(root / "train.jsonl")]
    (tmp_path / "shards").mkdir()
    renamed = [{"question": r["prompt"], "solution": r["response"], "final": r["answer"]} for r in rows]
    _parquet(tmp_path / "shards" / "a.parquet", renamed[:40])
    _parquet(tmp_path / "shards" / "b.parquet", renamed[40:])
    argv = overrides(root, extra=[f"logging.dir={tmp_path}/out/tb", f"checkpoint.dir={tmp_path}/out/ck"])
    jsonl = check_inputs(load_config(None, argv + ["data.cache_dir=none"])).train
    mapped = ["data.fields.prompt=question", "data.fields.response=solution", "data.fields.answer=final"]
    parquet = check_inputs(load_config(None, argv + [f"data.train={tmp_path}/shards"] + mapped)).train
    assert parquet.folder.startswith(f"{tmp_path}/out/data_cache/") and _tokens(parquet) == _tokens(jsonl)
    _parquet(tmp_path / "shards" / "b.parquet", [{"question": "q", "solution": 5, "final": "1"}])
    with pytest.raises(PreflightError) as error:
        check_inputs(load_config(None, argv + [f"data.train={tmp_path}/shards"] + mapped))
    assert str(error.value) == (f"data.train: {tmp_path}/shards/b.parquet:1: column 'solution' "
                                f"(data.fields.response) must be a string, got int")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PreflightError, match=f"^data.cache_dir: {tmp_path}/afile is a file, not a folder$"):
        check_inputs(load_config(None, argv + [f"data.cache_dir={tmp_path}/afile"]))
