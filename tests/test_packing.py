"""The C++ packer and its pure-Python twin: identical output, and the packing invariants."""

import random

import numpy as np
import pytest

from engine.data import packing
from engine.data.packing import IGNORE_INDEX, balance_py, collate_packed, ffd_pack_py, pack_for_ranks


def random_lengths(n, seed, hi=300):
    rng = random.Random(seed)
    return [rng.randint(1, hi) for _ in range(n)]


def test_native_extension_is_built():
    assert packing.native_available(), "engine._packing missing: `pip install -e .` should build csrc/packing.cpp"


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [300, 512, 1000])
def test_cpp_and_python_identical(seed, budget):
    lengths = random_lengths(700, seed)
    assert packing._native.ffd_pack(lengths, budget) == ffd_pack_py(lengths, budget)
    tokens = random_lengths(48, seed + 100, hi=5000)
    for ranks in (1, 2, 3, 4, 8):
        if len(tokens) % ranks == 0:
            assert packing._native.balance(tokens, ranks) == balance_py(tokens, ranks)


def test_ffd_invariants():
    lengths = random_lengths(1000, 0)
    bins = packing.ffd_pack(lengths, 512)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every sequence exactly once: nothing dropped
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= 512
    assert len(bins) <= 1.25 * sum(lengths) / 512 + 2  # FFD is near the lower bound on random sizes
    # agrees with a naive O(n * bins) first-fit-decreasing written independently
    naive: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, f in enumerate(free) if f >= lengths[i]), len(free))
        if k == len(free):
            naive.append([])
            free.append(512)
        naive[k].append(i)
        free[k] -= lengths[i]
    assert bins == naive


def test_ffd_exact_small_case():
    # sorted: 6(0) 5(2) 4(1) 3(3) 2(4); budget 10 -> [6, 4] [5, 3, 2]
    assert ffd_pack_py([6, 4, 5, 3, 2], 10) == [[0, 1], [2, 3, 4]]
    assert packing.ffd_pack([6, 4, 5, 3, 2], 10) == [[0, 1], [2, 3, 4]]


def test_ffd_rejects_too_long_and_bad_budget():
    with pytest.raises(ValueError, match="sequence 1 has length 11"):
        packing.ffd_pack([3, 11], 10)
    with pytest.raises(ValueError, match="sequence 0 has length 0"):
        ffd_pack_py([0], 10)
    with pytest.raises(ValueError, match="budget must be positive"):
        packing.ffd_pack([1], 0)


def test_balance_equal_counts_and_loads():
    tokens = random_lengths(64, 3, hi=4000)
    out = packing.balance(tokens, 4)
    assert sorted(i for r in out for i in r) == list(range(64))
    assert {len(r) for r in out} == {16}
    loads = [sum(tokens[i] for i in r) for r in out]
    assert max(loads) - min(loads) <= max(tokens)
    with pytest.raises(ValueError, match="do not divide evenly"):
        packing.balance(tokens[:7], 2)


def test_pack_for_ranks_even_counts():
    lengths = random_lengths(37, 5)
    for ranks in (1, 2, 3, 8):
        plan = pack_for_ranks(lengths, 400, ranks)
        assert len(plan) == ranks and len({len(r) for r in plan}) == 1
        assert sorted(i for r in plan for mb in r for i in mb) == list(range(37))
    plan = pack_for_ranks([5], 10, 2)  # fewer sequences than ranks: an empty micro-batch fills in
    assert sorted(len(mb) for r in plan for mb in r) == [0, 1]


def test_collate_packed_labels_and_boundaries():
    batch = collate_packed([[1, 2, 3, 4], [5, 6, 7]], [[0, 0, 1, 1], [0, 1, 1]], [10, 11])
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert batch.cu_seqlens.tolist() == [0, 4, 7] and batch.max_seqlen == 4
    # label t is token t+1 of the same sequence where that token is a trajectory token; never crosses
    assert batch.labels.tolist() == [IGNORE_INDEX, 3, 4, IGNORE_INDEX, 6, 7, IGNORE_INDEX]
    assert batch.sample_ids.tolist() == [10, 11]


def test_python_fallback_speed_shape():
    """The fallback handles a realistic batch (512 sequences) without the extension."""
    lengths = np.random.default_rng(0).lognormal(7.9, 0.6, 512).clip(1, 16384).astype(int).tolist()
    bins = ffd_pack_py(lengths, 16384)
    assert sorted(i for b in bins for i in b) == list(range(512))
