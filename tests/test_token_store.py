"""Token store: same samples and batches as in-memory tokenization, built once and reused by key, clear errors."""

import json
import os

import numpy as np
import pytest
import torch

from engine.data import token_store
from engine.data.packing import collate_packed
from engine.data.sft_dataset import load_sft_file
from engine.data.synthetic import SyntheticTaskConfig, write_task
from engine.data.token_store import TokenStore, open_token_store, write_token_store
from engine.data.tokenizer import build_char_tokenizer
from engine.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    write_task(SyntheticTaskConfig(num_train=60, num_val=8, num_rl=0, num_eval=0), out)
    return out / "train.jsonl"


def test_store_matches_in_memory_tokenization(tok, task, tmp_path):
    samples, stats = load_sft_file(task, tok, 96)  # small max_seq_len: some rows are truncated
    store = open_token_store([task], tok, 96, "truncate", tmp_path, progress=False)
    assert len(store) == len(samples) and stats.num_truncated > 0
    assert store.stats == stats
    for i, s in enumerate(samples):
        ids, mask = store.sample(i)
        assert ids.tolist() == s.input_ids and mask.tolist() == s.loss_mask
    assert store.lengths_N.tolist() == [len(s) for s in samples]
    assert store.loss_tokens_N.tolist() == [sum(s.loss_mask[1:]) for s in samples]
    for ids in ([3], [5, 0, 17, 2], list(range(len(samples)))[::-1]):
        want = collate_packed([samples[i].input_ids for i in ids], [samples[i].loss_mask for i in ids], ids)
        got = store.collate(ids)
        for name in ("input_ids", "position_ids", "cu_seqlens", "labels", "sample_ids"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert got.max_seqlen == want.max_seqlen


def test_reused_by_key_and_rebuilt_when_inputs_change(tok, task, tmp_path, monkeypatch):
    first = open_token_store([task], tok, 128, "truncate", tmp_path, progress=False)
    calls = []
    real_build = token_store.build_token_store
    monkeypatch.setattr(token_store, "build_token_store", lambda *a, **k: calls.append(a) or real_build(*a, **k))
    again = open_token_store([task], tok, 128, "truncate", tmp_path, progress=False)
    assert again.path == first.path and calls == []  # same file, tokenizer and settings: reused
    open_token_store([task], tok, 128, "drop", tmp_path, progress=False)
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(task.read_bytes().replace(b'"response": "', b'"response": "so ', 1))
    changed = open_token_store([edited], tok, 128, "truncate", tmp_path, progress=False)
    assert len(calls) == 2 and changed.path != first.path
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []  # no half-built leftovers


def test_bad_rows_and_damaged_stores_fail_clearly(tok, task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'response'"):
        open_token_store([bad], tok, 64, "truncate", tmp_path / "stores", progress=False)
    (failed,) = (tmp_path / "stores").glob("*.failed")  # what waiting ranks would raise
    assert "bad.jsonl:2" in failed.read_text()
    assert not [p for p in (tmp_path / "stores").iterdir() if p.is_dir()]
    store = open_token_store([task], tok, 64, "truncate", tmp_path / "ok", progress=False)
    tokens = store.path / "tokens.i32"
    os.truncate(tokens, tokens.stat().st_size - 4)
    with pytest.raises(DataError, match=r"tokens.i32: size .* the store is damaged"):
        TokenStore(store.path)
    with pytest.raises(DataError, match="no samples"):
        write_token_store(tmp_path / "empty", [])
    with pytest.raises(DataError, match="sample 1: input_ids and loss_mask"):
        write_token_store(tmp_path / "uneven", [([1, 2], [0, 1]), ([1, 2], [1])])


def test_memory_per_sample_is_constant(tmp_path):
    """What a rank keeps resident after opening a store is 16 bytes per sample (offsets, lengths, loss counts),
    not its tokens or masks: measured with tracemalloc (numpy reports its buffers to it), so a store that read
    tokens.i32 or mask.u8 into memory would fail here."""
    import tracemalloc

    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 1000, n).tolist(), [0] * 3 + [1] * (n - 3)) for n in rng.integers(8, 400, 3000)]
    path = write_token_store(tmp_path / "s", samples)
    num_tokens = sum(len(s[0]) for s in samples)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = TokenStore(path)
        for i in range(0, len(store), 97):  # reading samples keeps nothing either
            store.sample(i)
        resident = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.meta["num_tokens"] == num_tokens
    per_sample = 16 * len(samples) + 8
    assert resident < per_sample + 64 * 1024, (resident, per_sample)  # a few small objects beyond the arrays
    assert resident < num_tokens  # a resident mask.u8 alone is num_tokens bytes, tokens.i32 four times that
