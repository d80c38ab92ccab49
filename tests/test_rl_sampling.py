"""DAPO dynamic sampling with fake generation rounds."""

import pytest

from engine.rl.sampling import Group, dynamic_sampling, is_informative


def fake_rounds(pattern):
    """generate_round returning, per round, groups with the given rewards (payload = (round, index))."""
    calls = []

    def generate_round(k):
        calls.append(k)
        return [Group(r, payload=(k, i)) for i, r in enumerate(pattern)]

    return generate_round, calls


# 4 groups per round: 2 informative, 1 all correct, 1 all wrong
ROUND = [[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]


def test_rounds_until_full():
    gen, calls = fake_rounds(ROUND)
    res = dynamic_sampling(gen, train_batch=5, max_gen_rounds=10)
    assert calls == [0, 1, 2] and res.num_rounds == 3  # 2 + 2 + 2 >= 5
    assert len(res.groups) == 5 and res.filled
    assert [g.payload for g in res.groups] == [(0, 0), (0, 3), (1, 0), (1, 3), (2, 0)]
    assert all(g.informative for g in res.groups)
    assert (res.num_generated, res.num_informative, res.num_all_correct, res.num_all_wrong) == (12, 6, 3, 3)
    assert res.kept_fraction == pytest.approx(0.5)
    assert res.round_sizes == [4, 4, 4]
    assert res.stats()["sampling/rounds"] == 3


def test_max_rounds_returns_partial():
    gen, calls = fake_rounds(ROUND)
    res = dynamic_sampling(gen, train_batch=5, max_gen_rounds=2)
    assert calls == [0, 1] and res.num_rounds == 2
    assert len(res.groups) == 4 and not res.filled


def test_nothing_informative():
    gen, _ = fake_rounds([[1, 1], [0, 0]])
    res = dynamic_sampling(gen, train_batch=1, max_gen_rounds=3)
    assert res.groups == [] and res.num_rounds == 3 and not res.filled and res.kept_fraction == 0


def test_exact_fill_in_one_round():
    gen, calls = fake_rounds(ROUND)
    res = dynamic_sampling(gen, train_batch=2, max_gen_rounds=1)
    assert calls == [0] and res.filled and len(res.groups) == 2


def test_no_filtering_is_one_round_keep_all():
    gen, calls = fake_rounds(ROUND)
    res = dynamic_sampling(gen, train_batch=4, max_gen_rounds=5, filter_groups=False)
    assert calls == [0] and res.num_rounds == 1 and len(res.groups) == 4 and res.filled
    assert res.kept_fraction == 0.5  # informative share, for logging


def test_group_and_validation():
    assert is_informative([0.0, 1.0]) and not is_informative([0.5, 0.5]) and not is_informative([])
    assert Group([1, 0]).mean_reward == 0.5
    with pytest.raises(ValueError):
        Group([])
    with pytest.raises(ValueError):
        dynamic_sampling(lambda k: [], train_batch=0, max_gen_rounds=1)
    with pytest.raises(ValueError):
        dynamic_sampling(lambda k: [], train_batch=1, max_gen_rounds=0)
