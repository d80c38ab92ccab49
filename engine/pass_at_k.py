"""pass@k, maj@k and avg@k of a problem from its n samples, and their means over a set of problems.

    summary = summarize([ProblemSamples(rewards, correct, preds), ...], ks=[1, 4, 16])
    summary["pass@4"], summary["maj@4"], summary["avg@16"]          # fractions in [0, 1]

With n samples of which c are correct:
    avg@n    the mean reward over the n samples (pass@1 as the paper reports it, "avg@k" in DAPO's tables);
             with binary rewards, c / n
    pass@k   the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code"):
             1 - C(n - c, k) / C(n, k), the chance that at least one of k samples drawn without replacement
             from the n is correct
    maj@k    the chance that the majority answer of k samples drawn without replacement is correct. Samples vote
             with their final answer (`pred`; samples without one abstain); a tie between answers counts as the
             share of the tied answers that are correct. Exact (every k-subset) when there are at most
             EXACT_SUBSETS of them, else the mean over MC_DRAWS seeded random subsets.
k runs over `default_ks(n)`: 1, 2, 4, ... up to n, and n itself.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

EXACT_SUBSETS = 2000
MC_DRAWS = 500  # per problem: the mean over a set of problems averages their draws further


@dataclass
class ProblemSamples:
    """The n samples of one problem: reward, whether it counts as solved, and the final answer it gives."""

    rewards: list[float]
    correct: list[bool]
    preds: list[str | None]

    def __post_init__(self):
        if not (len(self.rewards) == len(self.correct) == len(self.preds)) or not self.rewards:
            raise ValueError("a problem needs n >= 1 samples with a reward, a correctness and a prediction each")


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n."""
    return sorted({2 ** i for i in range(max(n, 1).bit_length()) if 2 ** i <= n} | {n})


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn from n, c of them correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _majority_correct(preds: Sequence[str | None], right: dict[str, bool]) -> float:
    votes = Counter(p for p in preds if p is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [p for p, v in votes.items() if v == top]
    return sum(right[p] for p in tied) / len(tied)


def maj_at_k(preds: Sequence[str | None], correct: Sequence[bool], k: int, seed: int = 0) -> float:
    """Probability that the majority answer of k of the samples (drawn without replacement) is correct."""
    n = len(preds)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    right: dict[str, bool] = {}
    for p, c in zip(preds, correct):
        if p is not None:
            right[p] = right.get(p, False) or bool(c)  # equal answers are judged alike; one correct judgement wins
    if math.comb(n, k) <= EXACT_SUBSETS:
        subsets = list(itertools.combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [rng.sample(range(n), k) for _ in range(MC_DRAWS)]
    return sum(_majority_correct([preds[i] for i in s], right) for s in subsets) / len(subsets)


def summarize(problems: Sequence[ProblemSamples], ks: Sequence[int] | None = None) -> dict[str, float]:
    """Means over `problems` (fractions): avg@n, and pass@k and maj@k for each k (every problem needs the same n)."""
    if not problems:
        return {}
    n = len(problems[0].rewards)
    if any(len(p.rewards) != n for p in problems):
        raise ValueError("every problem needs the same number of samples")
    ks = [k for k in (ks or default_ks(n)) if 1 <= k <= n]
    out = {f"avg@{n}": sum(sum(p.rewards) / n for p in problems) / len(problems)}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(p.correct), k) for p in problems) / len(problems)
        out[f"maj@{k}"] = sum(maj_at_k(p.preds, p.correct, k) for p in problems) / len(problems)
    return out
