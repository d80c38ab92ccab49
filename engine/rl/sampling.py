"""DAPO dynamic sampling: keep generating rounds until `train_batch` informative groups are collected.

A group is one prompt's G on-policy samples with their rewards. If all G rewards are equal (all correct or
all wrong), every GRPO advantage (R - mean) / (std + eps) is 0 and the group contributes no gradient, only
noise in the normaliser; DAPO drops such groups and generates more:

    round k = 1, 2, ...:  groups_k = generate_round(k - 1)          (gen_batch prompts x G samples)
                          kept += [g for g in groups_k if rewards of g not all equal]
                          stop when len(kept) >= train_batch or k == max_gen_rounds
    return kept[:train_batch], K = number of rounds run

K enters the compute accounting (each round costs a generation pass over gen_batch x G samples). When
`max_gen_rounds` is reached with fewer than `train_batch` kept groups, `on_unfilled` decides:
    "error"        raise `UnfilledBatchError` (RETU: `max_num_gen_batches=10`, then a ValueError stops training,
                   `new_verl/recipe/dapo/dapo_ray_trainer.py:338-350`; map §3)
    "train-short"  return what was found with `filled` False (the trainer warns and updates on the short batch)
Without filtering (GRPO, LUFFY, SRFT, UPT) there is exactly one round and every group is kept.
RETU keeps a group when its number of correct samples is in 1..G-1 (`win_num_range`); with 0/1 rewards that is
"rewards not all equal", the test used here (it also covers non-binary rewards).

`generate_round(round_index) -> list[Group]` does the rollout and scoring; this module only decides what to
keep, so it is tested with plain Python fakes. `Group.rewards` are the rewards that decide informativeness
(the on-policy samples'); `Group.payload` carries whatever the trainer needs (prompt, token ids, logprobs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ON_UNFILLED", "Group", "SamplingResult", "UnfilledBatchError", "dynamic_sampling", "is_informative"]

ON_UNFILLED = ("error", "train-short")


class UnfilledBatchError(ValueError):
    """Dynamic sampling ran `max_gen_rounds` rounds without keeping `train_batch` informative groups."""


def is_informative(rewards: Sequence[float]) -> bool:
    """True when the rewards are not all equal (so group-normalised advantages are not all zero)."""
    return len(rewards) > 0 and max(rewards) != min(rewards)


@dataclass
class Group:
    """One prompt's samples: their rewards and an opaque payload for the trainer."""

    rewards: Sequence[float]
    payload: Any = None

    def __post_init__(self):
        self.rewards = [float(r) for r in self.rewards]
        if not self.rewards:
            raise ValueError("a Group needs at least one reward")

    @property
    def informative(self) -> bool:
        return is_informative(self.rewards)

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)


@dataclass
class SamplingResult:
    """Kept groups (at most train_batch) and what it took to get them."""

    groups: list[Group]
    num_rounds: int  # K, generation rounds run
    num_generated: int  # groups generated over all rounds
    num_informative: int  # of those, groups with unequal rewards (before truncation to train_batch)
    num_all_correct: int  # dropped: all rewards equal and > 0
    num_all_wrong: int  # dropped: all rewards equal and <= 0
    filled: bool  # len(groups) == train_batch (False: max_gen_rounds ran out first)
    round_sizes: list[int] = field(default_factory=list)  # groups generated per round

    @property
    def kept_fraction(self) -> float:
        """Informative groups / generated groups (1.0 without filtering)."""
        return self.num_informative / self.num_generated if self.num_generated else 0.0

    def stats(self) -> dict[str, float]:
        """Flat numbers for the metrics log."""
        return {"sampling/rounds": self.num_rounds, "sampling/generated_groups": self.num_generated,
                "sampling/kept_groups": len(self.groups), "sampling/kept_fraction": self.kept_fraction,
                "sampling/all_correct": self.num_all_correct, "sampling/all_wrong": self.num_all_wrong,
                "sampling/filled": float(self.filled)}


def dynamic_sampling(generate_round: Callable[[int], list[Group]], train_batch: int, max_gen_rounds: int,
                     *, filter_groups: bool = True, on_unfilled: str = "train-short") -> SamplingResult:
    """Run generation rounds and keep informative groups until `train_batch` are kept (see module docstring).

    filter_groups=False is plain GRPO sampling: one round, every group kept (the result is not truncated).
    on_unfilled: "error" raises `UnfilledBatchError` when the rounds run out first; "train-short" returns the
    short result (`filled` False).
    """
    if on_unfilled not in ON_UNFILLED:
        raise ValueError(f"on_unfilled must be one of {ON_UNFILLED}, got {on_unfilled!r}")
    if train_batch < 1:
        raise ValueError(f"train_batch must be >= 1, got {train_batch}")
    if max_gen_rounds < 1:
        raise ValueError(f"max_gen_rounds must be >= 1, got {max_gen_rounds}")
    if not filter_groups:
        groups = list(generate_round(0))
        n_inf = sum(g.informative for g in groups)
        return SamplingResult(groups, 1, len(groups), n_inf, 0, 0, filled=len(groups) >= train_batch,
                              round_sizes=[len(groups)])
    kept: list[Group] = []
    sizes: list[int] = []
    n_correct = n_wrong = 0
    while len(kept) < train_batch and len(sizes) < max_gen_rounds:
        groups = list(generate_round(len(sizes)))
        sizes.append(len(groups))
        for g in groups:
            if g.informative:
                kept.append(g)
            elif g.rewards[0] > 0:
                n_correct += 1
            else:
                n_wrong += 1
    n_inf = len(kept)
    if n_inf < train_batch and on_unfilled == "error":
        raise UnfilledBatchError(
            f"dynamic sampling kept {n_inf} of {train_batch} groups after {len(sizes)} rounds of {sizes} prompts "
            f"({n_correct} all correct, {n_wrong} all wrong); raise rl.max_gen_rounds or rl.gen_batch, or set "
            f"rl.on_unfilled=train-short")
    return SamplingResult(kept[:train_batch], len(sizes), sum(sizes), n_inf, n_correct, n_wrong,
                          filled=n_inf >= train_batch, round_sizes=sizes)
