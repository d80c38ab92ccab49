"""The rollout interface: prompts (token ids) in, n sampled completions per prompt out.

Two backends implement it: `HFRollout` (transformers `generate`; CPU, tests, machines without vLLM) and
`VLLMRollout` (vLLM colocated on the training GPUs). The RL trainer only sees this interface:

    outs = rollout.generate(prompt_ids, SamplingParams(temperature=1.0, n=8, max_new_tokens=1024, seed=0))
    outs[i][j]  -> RolloutOutput of sample j for prompt i
    rollout.sleep(); ...update...; rollout.sync_weights(model); rollout.wake()

`RolloutOutput.token_ids` are the generated tokens **without** the stop token, so `text` is the answer as
the user sees it and an immediate stop gives `token_ids == []`, `text == ""`. When
`finish_reason == "stop"` the stop token is kept apart in `stop_token_id` (with its logprob): the trainer
appends it through `response_ids()` so that the policy learns to end its turn. `finish_reason == "length"`
means max_new_tokens ran out (no stop token).

`logprobs[t]` is log p(token_t) under the temperature-scaled distribution softmax(logits / T) the token
was drawn from (T = 1 for greedy, temperature 0), *before* top-p truncation: the same quantity the
trainer recomputes (with logits / T), so it can serve as old_logp. With top_p < 1 it differs from the
log-probability of the truncated, renormalised distribution actually sampled from.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["FINISH_REASONS", "Rollout", "RolloutOutput", "SamplingParams"]

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: temperature (0 = greedy), nucleus top_p, length cap, samples per prompt, seed."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    n: int = 1
    seed: int | None = None  # same seed (and same prompts, batch size) -> same samples; None: global RNG

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0 or None, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RolloutOutput:
    """One sampled completion of one prompt (see the module docstring for token_ids and logprobs)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: list[float] | None = None  # one per token_ids entry
    stop_token_id: int | None = None  # set iff finish_reason == "stop"
    stop_logprob: float | None = None

    def __post_init__(self):
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens")
        if (self.stop_token_id is not None) != (self.finish_reason == "stop"):
            raise ValueError("stop_token_id must be set exactly when finish_reason == 'stop'")

    def response_ids(self) -> list[int]:
        """Tokens to train on: the generated tokens plus the stop token when the turn ended."""
        return self.token_ids + ([self.stop_token_id] if self.stop_token_id is not None else [])

    def response_logprobs(self) -> list[float] | None:
        """Logprobs aligned with `response_ids()` (None if the backend gave none)."""
        if self.logprobs is None:
            return None
        if self.stop_token_id is None:
            return list(self.logprobs)
        return self.logprobs + [self.stop_logprob if self.stop_logprob is not None else math.nan]


class Rollout(abc.ABC):
    """A generation backend. sync_weights / sleep / wake are no-ops for backends that share the trainer's model."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[RolloutOutput]]:
        """n samples for each prompt, in prompt order: result[i] has params.n outputs for prompt_ids[i]."""

    @abc.abstractmethod
    def sync_weights(self, state_dict_or_model: Any) -> None:
        """Make the backend sample from the current policy weights."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """Free the backend's accelerator memory (KV cache, weights) before a training update."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Reacquire what `sleep` freed, before generating."""
