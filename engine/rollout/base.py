"""The rollout interface: prompts (token ids) in, n sampled completions per prompt out.

Two backends implement it: `HFRollout` (transformers `generate`; CPU, tests, machines without vLLM) and
`VLLMRollout` (vLLM colocated on the training GPUs). The RL trainer only sees this interface:

    outs = rollout.generate(prompt_ids, SamplingParams(temperature=1.0, n=8, max_new_tokens=1024, seed=0))
    outs[i][j]  -> RolloutOutput of sample j for prompt i
    rollout.sleep(); ...update...; rollout.sync_weights(model, version); rollout.wake()

The lifecycle of one RL step is generate -> sleep -> (training update) -> sync_weights -> wake -> generate.
`sync_weights(model, version)` is collective (every training rank calls it: the sharded weights are gathered
bucket by bucket, `engine.rollout.weight_sync`), verifies what the backend now holds, and stamps `version`
on every later output (`RolloutOutput.weight_version`); `check_weight_version` turns an output sampled
from other weights into a `WeightSyncError`.

Seeds: with `params.seed` set, sample j of prompt i draws from its own stream, seeded by
`sample_seed(seed, i, j)`, so samples are independent and a run is reproducible.

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
import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from engine.rollout.weight_sync import WeightSyncError

__all__ = ["FINISH_REASONS", "Rollout", "RolloutOutput", "SamplingParams", "check_weight_version", "sample_seed"]

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: temperature (0 = greedy), nucleus top_p, length cap, samples per prompt, seed, logprobs."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    n: int = 1
    seed: int | None = None  # same seed (and same prompts, batch size) -> same samples; None: global RNG
    logprobs: bool = True  # False: outputs carry no logprobs (HF skips its teacher-forced pass, vLLM its sampler's)

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
    weight_version: int | None = None  # the `sync_weights` version of the weights that sampled it

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


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """A 63-bit seed for sample `sample` of prompt `prompt` of a call seeded with `seed` (distinct streams)."""
    digest = hashlib.blake2b(f"{seed}:{prompt}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_weight_version(outputs: list[list[RolloutOutput]], expected: int) -> None:
    """Raise `WeightSyncError` if any output was sampled by weights other than version `expected`."""
    stale = sorted({o.weight_version for outs in outputs for o in outs if o.weight_version != expected},
                   key=str)
    if stale:
        raise WeightSyncError(f"rollout outputs carry weight version(s) {stale}, but the policy is at version "
                              f"{expected}: the rollout engine was not synced after the last update")


class Rollout(abc.ABC):
    """A generation backend, driven by the trainer through this interface only (see the module docstring)."""

    weight_version: int = 0
    """Version of the weights the backend samples from (set by `sync_weights`)."""
    backend: str = ""
    """The `rollout.backend` name of the implementation ("hf", "vllm"): reports say what generated a number."""

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(index, count) of the data-parallel rollout groups: ranks of one tensor-parallel group generate
        the same prompts with the same seeds. (rank, world size) when every rank generates alone."""
        if torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    @abc.abstractmethod
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[RolloutOutput]]:
        """n samples for each prompt, in prompt order: result[i] has params.n outputs for prompt_ids[i]."""

    @abc.abstractmethod
    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Collective: load the policy's current weights, verify them, and label later outputs `version`.

        `version` must be newer than `weight_version`; an older or equal one raises `WeightSyncError`."""

    def _check_newer(self, version: int) -> None:
        if version <= self.weight_version:
            raise WeightSyncError(f"refusing weight version {version}: the rollout already holds version "
                                  f"{self.weight_version} (versions must increase with every update)")

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend for good (end of run): an engine it owns is shut down."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """Free the backend's accelerator memory (KV cache, weights) before a training update."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Reacquire what `sleep` freed, before generating."""
