"""The synthetic math task: valid trajectories, disjoint splits, seeded, difficulty mixes, config errors."""

import json
import re

import pytest

from engine.data.synthetic import (
    SyntheticTaskConfig,
    generate_task,
    level_weights,
    levels,
    write_jsonl,
    write_task,
)

SMALL = dict(num_train=300, num_val=50, num_rl=80, num_eval=60)


def key(row):
    """The problem behind a row, parsed from the prompt wording: (start, ((op, operand), ...))."""
    head, *phrases = row["prompt"].split(". How many")[0].split(", ")
    ops = []
    for phrase in phrases:
        phrase = phrase.removeprefix("then ")
        if "doubles" in phrase or "triples" in phrase:
            ops.append(("*", 2 if "doubles" in phrase else 3))
        else:
            ops.append(("+" if phrase.endswith("more") else "-", int(re.search(r"\d+", phrase)[0])))
    return int(re.search(r"\d+", head)[0]), tuple(ops)


def check_trajectory(row):
    steps = row["response"].split(" ")
    assert steps[-1] == f"\\boxed{{{row['answer']}}}"
    value = key(row)[0]
    for step in steps[:-1]:
        m = re.fullmatch(r"(\d+)([+\-*])(\d+)=(\d+)\.", step)
        assert m, step
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert a == value
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
        value = c
    assert str(value) == row["answer"]
    assert len(steps) - 1 == row["num_ops"]


def test_rows_are_correct_and_short():
    cfg = SyntheticTaskConfig(**SMALL, max_ops=3, max_digits=2, operations=("+", "-", "*"))
    task = generate_task(cfg)
    assert {k: len(v) for k, v in task.items()} == {"train": 300, "val": 50, "rl": 80, "eval": 60}
    for split in ("train", "val", "rl"):
        for row in task[split]:
            assert set(row) == {"id", "prompt", "response", "answer", "num_ops", "num_digits"}
            check_trajectory(row)
            assert int(row["answer"]) >= 0
            assert row["prompt"].isascii() and row["response"].isascii()
    assert set(task["eval"][0]) == {"id", "prompt", "answer", "num_ops", "num_digits"}
    # The easiest level stays well under 100 characters of trajectory.
    easy = generate_task(SyntheticTaskConfig(**SMALL, max_ops=2, max_digits=2))
    assert max(len(r["response"]) for r in easy["train"]) < 60
    assert all(len(r["prompt"]) < 120 for r in easy["train"])


def test_splits_are_disjoint_by_problem():
    task = generate_task(SyntheticTaskConfig(**SMALL, max_ops=2, max_digits=2))
    keys = {split: {key(r) for r in rows} for split, rows in task.items()}
    for split, rows in task.items():
        assert len(keys[split]) == len(rows), f"duplicate problems within {split}"
    splits = list(keys)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not keys[a] & keys[b], f"{a} and {b} share problems"


def test_seeded_and_nested_train_sets():
    a = generate_task(SyntheticTaskConfig(**SMALL, seed=3))
    assert a == generate_task(SyntheticTaskConfig(**SMALL, seed=3))
    assert a["train"] != generate_task(SyntheticTaskConfig(**SMALL, seed=4))["train"]
    # Data-scale sweeps: the small train set is a prefix of the large one; eval/rl/val do not move.
    big = generate_task(SyntheticTaskConfig(**{**SMALL, "num_train": 900}, seed=3))
    assert big["train"][:300] == a["train"]
    assert all(big[s] == a[s] for s in ("val", "rl", "eval"))


def test_val_mix_gives_every_scene_one_validation_set():
    base = dict(**{**SMALL, "num_train": 600}, max_ops=4, max_digits=2, val_mix="uniform")
    tasks = {mix: generate_task(SyntheticTaskConfig(**base, difficulty_mix=mix)) for mix in ("easy", "uniform", "hard")}
    assert tasks["easy"]["val"] == tasks["uniform"]["val"] == tasks["hard"]["val"]
    assert tasks["easy"]["train"] != tasks["hard"]["train"]
    own = generate_task(SyntheticTaskConfig(**{**base, "val_mix": None}, difficulty_mix="hard"))
    assert own["val"] != tasks["hard"]["val"]  # without it, val follows the train mix
    with pytest.raises(ValueError, match="val_mix"):
        SyntheticTaskConfig(val_mix="medium")


def test_difficulty_mixes():
    base = dict(**{**SMALL, "num_train": 1500}, max_ops=4, max_digits=3)
    mean_ops = {}
    for mix in ("easy", "uniform", "hard"):
        task = generate_task(SyntheticTaskConfig(**base, difficulty_mix=mix))
        mean_ops[mix] = sum(r["num_ops"] + r["num_digits"] for r in task["train"]) / len(task["train"])
        # RL and eval keep their own (uniform) mix, so every run shares them.
        assert task["eval"] == generate_task(SyntheticTaskConfig(**base))["eval"]
    assert mean_ops["easy"] < mean_ops["uniform"] < mean_ops["hard"]
    cfg = SyntheticTaskConfig(**base)
    assert levels(cfg)[0] == (1, 1) and levels(cfg)[-1] == (4, 3)
    w = level_weights(cfg, "hard")
    assert w[0] < w[-1]


def test_write_jsonl_and_task(tmp_path):
    rows = [{"prompt": "p", "response": "r", "answer": "1"}]
    path = write_jsonl(rows, tmp_path / "sub" / "x.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    paths = write_task(SyntheticTaskConfig(**SMALL), tmp_path / "task")
    assert sorted(paths) == ["eval", "rl", "train", "val"]
    assert len(paths["train"].read_text().splitlines()) == 300
    assert json.loads((tmp_path / "task" / "task_config.json").read_text())["num_train"] == 300


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_train", -1),
        ("min_ops", 0),
        ("max_ops", 0),
        ("max_digits", 9),
        ("difficulty_mix", "medium"),
        ("eval_mix", "x"),
        ("operations", ("/",)),
        ("operations", ("-",)),
        ("seed", 1.5),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticTaskConfig(**{field: value})


def test_too_small_problem_space_fails_clearly():
    cfg = SyntheticTaskConfig(num_train=500, num_val=0, num_rl=0, num_eval=0, max_ops=1, max_digits=1)
    with pytest.raises(ValueError, match="distinct 'train' problems"):
        generate_task(cfg)


def test_exhausted_level_is_reported(caplog):
    # One-operation, one-digit problems number ~135: the eval and rl splits take most of them, so the
    # train split cannot hold its uniform half of that level and is filled with two-operation problems.
    cfg = SyntheticTaskConfig(num_train=400, num_val=0, num_rl=100, num_eval=100, max_ops=2, max_digits=1)
    with caplog.at_level("WARNING", logger="ceiling"):
        task = generate_task(cfg)
    one_op = sum(r["num_ops"] == 1 for r in task["train"])
    assert one_op < 100
    assert "split 'train'" in caplog.text and "(num_ops=1, num_digits=1)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ceiling"):
        generate_task(SyntheticTaskConfig(**SMALL, max_ops=3, max_digits=2))
    assert "too few distinct problems" not in caplog.text
