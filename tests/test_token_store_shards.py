"""Sharded tokenization: shards cover every row once, and a store built by N processes or ranks is the same
byte for byte as one built by one process; a bad row anywhere fails the build everywhere with file:line."""

import json
import os
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp

from engine.data import token_store
from engine.data.files import iter_raw_rows
from engine.data.row_shards import iter_piece_rows, plan_shards
from engine.data.synthetic import SyntheticTaskConfig, write_task
from engine.data.token_store import TokenStore, build_token_store, open_token_store, write_token_store
from engine.data.tokenizer import build_char_tokenizer
from engine.errors import DataError

DATA_FILES = ("tokens.i32", "mask.u8", "offsets.i64")


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two JSONL files of the synthetic task (the second with blank lines and no final newline)."""
    out = tmp_path_factory.mktemp("task")
    write_task(SyntheticTaskConfig(num_train=90, num_val=40, num_rl=0, num_eval=0), out)
    second = out / "second.jsonl"
    lines = (out / "val.jsonl").read_text().splitlines()
    second.write_text("\n".join(line + ("\n" if i % 9 == 0 else "") for i, line in enumerate(lines)))
    return [out / "train.jsonl", second]


def _store_bytes(path):
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("build_seconds")
    return {name: (path / name).read_bytes() for name in DATA_FILES}, meta


def test_shards_cover_every_row_once_in_order(tmp_path):
    rows = [{"prompt": "p" * (1 + i % 37), "response": "r"} for i in range(40)]
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + ("\n\n" if i % 7 == 0 else "\n") for i, r in enumerate(rows)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    table = tmp_path / "c.parquet"
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(30)], "response": ["x"] * 30}), table,
                   row_group_size=7)
    last = tmp_path / "last.jsonl"
    last.write_text(json.dumps({"prompt": "z", "response": "y"}))  # no final newline
    paths = [a, empty, table, last]
    want = [(str(w), r) for p in paths for w, r in iter_raw_rows(p)]
    for n in range(1, 25):
        shards = plan_shards(paths, n)
        assert len(shards) == n
        got = [(str(w), r) for shard in shards for piece in shard for w, r in iter_piece_rows(piece)]
        assert got == want, f"{n} shards"
    sizes = [sum(p.end - p.start for p in shard if not p.table) for shard in plan_shards([a], 4)]
    assert max(sizes) < 2 * min(sizes)  # about equal bytes


def test_pool_of_workers_builds_the_same_store(tok, files, tmp_path):
    one = build_token_store(files, tok, 96, "truncate", tmp_path / "one", progress=False)
    three = build_token_store(files, tok, 96, "truncate", tmp_path / "three", progress=False, workers=3)
    assert _store_bytes(one) == _store_bytes(three)
    assert TokenStore(three).stats.num_truncated > 0  # the stats were merged over the shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "three"]  # no shard or tmp dirs left


def test_bad_row_in_a_later_shard_fails_the_pool_build_with_file_line(tok, files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = files[0].read_text().splitlines()
    lines[-3] = json.dumps({"prompt": "q"})  # in the last of two shards
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:{len(lines) - 2}: missing field 'response'"):
        open_token_store([bad], tok, 96, "truncate", tmp_path / "stores", progress=False, workers=2)
    (failed,) = (tmp_path / "stores").glob("*.failed")
    assert f"bad.jsonl:{len(lines) - 2}" in failed.read_text()
    assert [p.name for p in (tmp_path / "stores").iterdir()] == [failed.name]  # no shard, tmp or store dirs


def test_loss_counts_read_in_bounded_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 50, n).tolist(), rng.integers(0, 2, n).tolist()) for n in rng.integers(1, 40, 200)]
    path = write_token_store(tmp_path / "s", samples)
    monkeypatch.setattr(token_store, "LOSS_COUNT_TOKENS", 16)  # many chunks, some samples longer than one
    store = TokenStore(path)
    assert store.loss_tokens_N.tolist() == [sum(m[1:]) for _, m in samples]


def _rank_worker(rank, port, jobs, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for k, (paths, root) in enumerate(jobs):
            try:
                store = open_token_store(paths, build_char_tokenizer(), 96, "truncate", root, progress=False)
                out[k, rank] = str(store.path)
            except DataError as exc:
                out[k, rank] = f"error: {exc}"
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_build_the_same_store_and_share_failures(tok, files, tmp_path):
    single = build_token_store(files, tok, 96, "truncate", tmp_path / "single", progress=False)
    bad = tmp_path / "bad.jsonl"
    lines = files[0].read_text().splitlines()
    lines[-2] = "{not json"  # in rank 1's shard
    bad.write_text("\n".join(lines) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    jobs = [([str(p) for p in files], str(tmp_path / "ranks")), ([str(bad)], str(tmp_path / "bad_stores")),
            ([str(tmp_path / "missing.jsonl")], str(tmp_path / "none"))]
    mp.spawn(_rank_worker, args=(port, jobs, out), nprocs=2)

    assert out[0, 0] == out[0, 1] and _store_bytes(single) == _store_bytes(TokenStore(out[0, 0]).path)
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == [os.path.basename(out[0, 0])]
    for rank in (0, 1):  # rank 1 raises its own error; rank 0 the same message, read from rank 1's file
        message = out[1, rank]
        assert message.startswith("error: ") and f"bad.jsonl:{len(lines) - 1}: bad JSON" in message, message
    assert [p.suffix for p in (tmp_path / "bad_stores").iterdir()] == [".failed"]
    assert out[2, 0] == out[2, 1] == f"error: {tmp_path / 'missing.jsonl'}: no such file"  # no rank hangs


def test_tokenize_workers_is_validated():
    from engine.config import SFTJobConfig, load_config
    from engine.errors import ConfigError
    assert load_config(None, SFTJobConfig, ["data.tokenize_workers=4"]).data.tokenize_workers == 4
    with pytest.raises(ConfigError, match="data.tokenize_workers must be >= 1, got 0"):
        load_config(None, SFTJobConfig, ["data.tokenize_workers=0"])
    with pytest.raises(ValueError, match="workers must be >= 1"):
        open_token_store([], None, 96, "truncate", "unused", workers=0)
