"""The synthetic math task: seeded arithmetic word problems with step-by-step expert trajectories.

Why: the paper's sweeps (SFT data scale, easy/uniform/hard difficulty, SFT-then-RL branches) need a
task a tiny model learns on CPU in minutes, with a verifiable integer answer. A problem is a start
value followed by `num_ops` operations, each operand having `num_digits` digits:

    prompt:   "Tom has 23 apples, buys 15 more, then gives away 7. How many apples now?"
    response: "23+15=38. 38-7=31. \\boxed{31}"
    answer:   "31"

Difficulty level = (num_ops, num_digits). `difficulty_mix` weights the levels of the SFT train and
validation sets (`val_mix` gives validation its own): "uniform" (all levels equally), "easy" (weight 1 - s + 0.1) or "hard" (s + 0.1),
where s in [0, 1] is the level's normalised difficulty. The RL prompt set and the eval set use their
own mixes (uniform by default), so easy/hard/small/large SFT runs share the same RL and eval sets.

Splits are disjoint by problem (start value and operation sequence, whatever the wording). They are
drawn in the order eval, rl, val, train, each from its own seeded stream, so the eval set does not
depend on `num_train`, and a smaller train set is a prefix of a larger one with the same seed.
Answers stay non-negative: a subtraction never exceeds the current value.

    python -c "from engine.data.synthetic import *; write_task(SyntheticTaskConfig(), 'data/synth')"
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from engine.rundir.files import write_json_atomic

Mix = Literal["uniform", "easy", "hard"]
MIXES = ("uniform", "easy", "hard")
OPERATIONS = ("+", "-", "*")
SPLITS = ("eval", "rl", "val", "train")  # generation order (see module docstring)

NAMES = ("Tom", "Ann", "Bob", "Eva", "Sam", "Mia", "Max", "Zoe")
ITEMS = ("apples", "pens", "coins", "books", "cards", "eggs", "shells", "stamps")
ADD_PHRASES = ("buys {b} more", "finds {b} more", "gets {b} more")
SUB_PHRASES = ("gives away {b}", "loses {b}", "sells {b}")
MUL_PHRASES = {2: "doubles them", 3: "triples them"}

Problem = tuple[int, tuple[tuple[str, int], ...]]  # (start, ((op, operand), ...)): the dedup key

log = logging.getLogger("ceiling")


@dataclass
class SyntheticTaskConfig:
    """Sizes, difficulty range and seed of the synthetic math task."""

    num_train: int = 2000
    """SFT training rows (expert trajectories)."""
    num_val: int = 200
    """Held-out SFT rows for the validation loss (same mix as train)."""
    num_rl: int = 500
    """RL prompts (with answers and expert trajectories for LUFFY/SRFT/UPT)."""
    num_eval: int = 200
    """Evaluation prompts with answers."""
    min_ops: int = 1
    """Fewest operations after the start value."""
    max_ops: int = 3
    """Most operations after the start value."""
    min_digits: int = 1
    """Fewest digits per number."""
    max_digits: int = 2
    """Most digits per number."""
    difficulty_mix: Mix = "uniform"
    """Level weights of train (and of val unless `val_mix` is set): 'uniform', 'easy' or 'hard'."""
    val_mix: Mix | None = None
    """Level weights of val (None: `difficulty_mix`). Set it to compare validation losses across scenes of
    different mixes: the val split is drawn before train, so scenes with one `val_mix` share one val set."""
    rl_mix: Mix = "uniform"
    """Level weights of the RL prompt set."""
    eval_mix: Mix = "uniform"
    """Level weights of the eval set."""
    operations: tuple[str, ...] = ("+", "-")
    """Allowed operations among '+', '-', '*' ('*' doubles or triples the value)."""
    seed: int = 0
    """Seed of every split's random stream."""

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "num_rl", "num_eval", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SyntheticTaskConfig.{name} must be an integer >= 0, got {value!r}")
        for lo, hi, top in (("min_ops", "max_ops", 8), ("min_digits", "max_digits", 6)):
            a, b = getattr(self, lo), getattr(self, hi)
            if not isinstance(a, int) or isinstance(a, bool) or not 1 <= a <= top:
                raise ValueError(f"SyntheticTaskConfig.{lo} must be an integer in [1, {top}], got {a!r}")
            if not isinstance(b, int) or isinstance(b, bool) or not a <= b <= top:
                raise ValueError(
                    f"SyntheticTaskConfig.{hi} must be an integer in [{lo}={a}, {top}], got {b!r}"
                )
        for name in ("difficulty_mix", "rl_mix", "eval_mix", "val_mix"):
            if getattr(self, name) not in MIXES and not (name == "val_mix" and self.val_mix is None):
                raise ValueError(
                    f"SyntheticTaskConfig.{name} must be one of {MIXES}, got {getattr(self, name)!r}"
                )
        self.operations = tuple(self.operations)
        if not self.operations or any(op not in OPERATIONS for op in self.operations):
            raise ValueError(
                f"SyntheticTaskConfig.operations must be a non-empty subset of {OPERATIONS}, "
                f"got {self.operations!r}"
            )
        if "+" not in self.operations:
            raise ValueError("SyntheticTaskConfig.operations must include '+' (a subtraction may not fit)")


def levels(cfg: SyntheticTaskConfig) -> list[tuple[int, int]]:
    """All difficulty levels (num_ops, num_digits), easiest first."""
    return [
        (o, d) for o in range(cfg.min_ops, cfg.max_ops + 1) for d in range(cfg.min_digits, cfg.max_digits + 1)
    ]


def level_weights(cfg: SyntheticTaskConfig, mix: str) -> list[float]:
    """Sampling weight of each level in `levels(cfg)` under `mix`."""
    span_o, span_d = cfg.max_ops - cfg.min_ops, cfg.max_digits - cfg.min_digits
    weights = []
    for o, d in levels(cfg):
        # Normalised difficulty: mean of the two axes' positions (0 when the range is a single level).
        parts = [(o - cfg.min_ops) / span_o] if span_o else []
        parts += [(d - cfg.min_digits) / span_d] if span_d else []
        s = sum(parts) / len(parts) if parts else 0.0
        weights.append({"uniform": 1.0, "easy": 1.0 - s + 0.1, "hard": s + 0.1}[mix])
    return weights


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def sample_problem(rng: random.Random, cfg: SyntheticTaskConfig, num_ops: int, num_digits: int) -> Problem:
    """Draw a start value and `num_ops` operations whose running value never goes negative."""
    value = _operand(rng, num_digits)
    start, ops = value, []
    for _ in range(num_ops):
        op = rng.choice(cfg.operations)
        b = _operand(rng, num_digits) if op != "*" else rng.choice((2, 3))
        if op == "-" and b > value:
            op = "+"  # keep the answer non-negative
        value = value + b if op == "+" else value - b if op == "-" else value * b
        ops.append((op, b))
    return start, tuple(ops)


def solve(problem: Problem) -> tuple[int, list[str]]:
    """The answer and the trajectory steps, e.g. (31, ["23+15=38.", "38-7=31."])."""
    value, steps = problem[0], []
    for op, b in problem[1]:
        new = value + b if op == "+" else value - b if op == "-" else value * b
        steps.append(f"{value}{op}{b}={new}.")
        value = new
    return value, steps


def render(problem: Problem, rng: random.Random) -> tuple[str, str, str]:
    """(prompt, response, answer) of a problem; the wording is drawn from `rng`."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    phrases = []
    for op, b in problem[1]:
        if op == "*":
            phrases.append(MUL_PHRASES[b])
        else:
            phrases.append(rng.choice(ADD_PHRASES if op == "+" else SUB_PHRASES).format(b=b))
    prompt = f"{name} has {problem[0]} {item}, {', then '.join(phrases)}. How many {item} now?"
    answer, steps = solve(problem)
    response = " ".join(steps + [f"\\boxed{{{answer}}}"])
    return prompt, response, str(answer)


def _split_seed(seed: int, split: str) -> int:
    return seed * 1000 + SPLITS.index(split) + 1


def generate_task(cfg: SyntheticTaskConfig) -> dict[str, list[dict]]:
    """All four splits: 'train'/'val' rows {id, prompt, response, answer, num_ops, num_digits},
    'rl' rows (same fields; `response` is the expert trajectory for off-policy algorithms) and
    'eval' rows {id, prompt, answer, num_ops, num_digits}. Splits are disjoint by problem."""
    return _draw_task(cfg)[0]


def task_problems(cfg: SyntheticTaskConfig, splits: Iterable[str] = SPLITS) -> set[Problem]:
    """The problems of `splits` (e.g. to keep another corpus, such as the pretraining text, disjoint)."""
    problems = _draw_task(cfg)[1]
    return {p for split in splits for p in problems[split]}


def _draw_task(cfg: SyntheticTaskConfig) -> tuple[dict[str, list[dict]], dict[str, list[Problem]]]:
    sizes = {"train": cfg.num_train, "val": cfg.num_val, "rl": cfg.num_rl, "eval": cfg.num_eval}
    mixes = {"train": cfg.difficulty_mix, "val": cfg.val_mix or cfg.difficulty_mix, "rl": cfg.rl_mix, "eval": cfg.eval_mix}
    seen: set[Problem] = set()
    out: dict[str, list[dict]] = {}
    problems: dict[str, list[Problem]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        rng = random.Random(_split_seed(cfg.seed, split))
        lv, weights = levels(cfg), level_weights(cfg, mixes[split])
        rows: list[dict] = []
        misses, max_misses = 0, 1000 + 100 * sizes[split]
        while len(rows) < sizes[split]:
            num_ops, num_digits = rng.choices(lv, weights)[0]
            problem = sample_problem(rng, cfg, num_ops, num_digits)
            if problem in seen:
                misses += 1
                if misses > max_misses:
                    raise ValueError(
                        f"SyntheticTaskConfig: cannot draw {sizes[split]} distinct '{split}' problems "
                        f"after {len(rows)}; raise max_ops/max_digits or lower the split sizes"
                    )
                continue
            seen.add(problem)
            problems[split].append(problem)
            prompt, response, answer = render(problem, rng)
            row = {
                "id": f"{split}-{len(rows)}",
                "prompt": prompt,
                "response": response,
                "answer": answer,
                "num_ops": num_ops,
                "num_digits": num_digits,
            }
            if split == "eval":
                del row["response"]
            rows.append(row)
        out[split] = rows
        _warn_short_levels(split, rows, lv, weights, mixes[split])
    return {split: out[split] for split in ("train", "val", "rl", "eval")}, problems


def _warn_short_levels(split: str, rows: list[dict], lv: list[tuple[int, int]], weights: list[float],
                       mix: str) -> None:
    """Warn when a level got far less than its share of the mix: it ran out of distinct problems (the
    earlier splits took them), so rejection sampling silently filled the split with the other levels."""
    counts = {level: 0 for level in lv}
    for row in rows:
        counts[(row["num_ops"], row["num_digits"])] += 1
    total = sum(weights)
    for level, w in zip(lv, weights):
        expected = len(rows) * w / total
        if expected >= 10 and counts[level] < 0.5 * expected:
            log.warning("synthetic task: split '%s' has %d problems at level (num_ops=%d, num_digits=%d) where "
                        "its '%s' mix asks for ~%d: the level has too few distinct problems left; the other "
                        "levels filled the split (raise min_ops/min_digits to drop the level)",
                        split, counts[level], level[0], level[1], mix, round(expected))


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSON Lines (one object per line, UTF-8); creates the parent dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_task(cfg: SyntheticTaskConfig, out_dir: str | Path) -> dict[str, Path]:
    """Generate the task and write `train.jsonl`, `val.jsonl`, `rl.jsonl`, `eval.jsonl` and
    `task_config.json` under `out_dir`; returns split -> path."""
    out_dir = Path(out_dir)
    paths = {
        split: write_jsonl(rows, out_dir / f"{split}.jsonl") for split, rows in generate_task(cfg).items()
    }
    write_json_atomic(out_dir / "task_config.json", asdict(cfg))  # last: the trainers take it to mean "written whole"
    return paths
