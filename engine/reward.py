"""Verifiable reward: math-verify on the response's final answer, binary 1.0 / 0.0.

    R(response, answer) = 1.0  if verify(parse(answer), parse(final answer of response)) else 0.0

The final answer (`mode`):
    "boxed"           the last `\\boxed{...}` (balanced braces) of the response, wrapped again as `\\boxed{...}`
                      so that math-verify extracts exactly that span. No `\\boxed` -> unparsed.
    "boxed-or-whole"  the same when the response has a `\\boxed`; without one, math-verify's default extraction
                      over the whole response (LaTeX and plain expressions, e.g. "The answer is 5." -> 5). This
                      is the behaviour of RETU's reward (`my_reward_fn` -> `default_accuracy_reward`, which first
                      runs `parse(content)` on the whole response; map §3), without its Levenshtein string
                      fallback (a fuzzy ratio > 0.6 counts as correct there), which is not ported.
In both modes a response whose last `\\boxed{` never closes (cut off inside its answer, e.g. at the length
limit) gets no credit: an earlier complete `\\boxed{}` is a discarded draft, not the answer.
The reference answer is wrapped as `\\boxed{...}` unless it already holds one. Equivalent forms score 1
(`\\frac{1}{2}` vs `0.5`, `x^2+1` vs `1+x^2`), which string matching would miss.

Outcomes, counted in `RewardStats` and never raised:
    correct     verify() is true                                        -> 1.0
    wrong       parsed, not equivalent                                  -> 0.0
    unparsed    no usable answer (see the modes), or math-verify extracts nothing -> 0.0
    error       an exception or timeout inside math-verify (response or reference side) -> 0.0

Why processes: math-verify's timeouts (`parse(parsing_timeout=)`, `verify(timeout_seconds=)`) use
`signal.alarm`, which only works in a process's main thread. `num_workers > 0` scores in a
`ProcessPoolExecutor` (spawn context: no fork of a process holding CUDA / NCCL threads) whose workers
run each call in their main thread, so timeouts hold and sympy runs on several cores. The pool is kept
per worker count and reused across calls (spawning costs ~1-2 s); `shutdown_pools()` closes them.
`num_workers=0` scores in-process (tests, small batches); off the main thread it runs without timeouts.

    scores, stats = score_responses(responses, answers, num_workers=8, timeout_s=5, mode="boxed-or-whole")
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

log = logging.getLogger("ceiling")

__all__ = ["REWARD_MODES", "RewardStats", "default_num_workers", "extract_boxed", "has_boxed", "score_one",
           "score_responses",
           "shutdown_pools"]

REWARD_MODES = ("boxed", "boxed-or-whole")

CORRECT, WRONG, UNPARSED, ERROR = "correct", "wrong", "unparsed", "error"
_BOXED = ("\\boxed{", "\\fbox{")


@dataclass
class RewardStats:
    """Counts over one call of `score_responses`; `num == correct + wrong + unparsed + errors`."""

    num: int = 0
    num_correct: int = 0
    num_unparsed: int = 0
    num_errors: int = 0

    def __post_init__(self):
        if min(self.num, self.num_correct, self.num_unparsed, self.num_errors) < 0:
            raise ValueError(f"RewardStats counts must be >= 0, got {self}")
        if self.num_correct + self.num_unparsed + self.num_errors > self.num:
            raise ValueError(f"RewardStats outcome counts exceed num: {self}")

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num if self.num else 0.0

    def __add__(self, other: RewardStats) -> RewardStats:
        return RewardStats(self.num + other.num, self.num_correct + other.num_correct,
                           self.num_unparsed + other.num_unparsed, self.num_errors + other.num_errors)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), else None; None too when that last one never
    closes its braces (a response cut off inside its answer gets no credit for an earlier box)."""
    if not text:
        return None
    starts = [i for tag in _BOXED for i in _find_all(text, tag)]
    if not starts:
        return None
    open_at = text.index("{", max(starts))
    depth = 0
    for j in range(open_at, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:j]
    return None


def has_boxed(text: str) -> bool:
    """True when the text opens a `\\boxed{` or `\\fbox{` (complete or not)."""
    return any(tag in text for tag in _BOXED)


def _find_all(text: str, sub: str):
    i = text.find(sub)
    while i != -1:
        yield i
        i = text.find(sub, i + 1)


def score_one(response: str, answer: str, timeout_s: float = 5, mode: str = "boxed") -> tuple[float, str]:
    """(reward, outcome) for one response; outcome is "correct" | "wrong" | "unparsed" | "error"."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {REWARD_MODES}, got {mode!r}")
    whole = mode == "boxed-or-whole" and not has_boxed(response)
    boxed = extract_boxed(response)
    if not whole and (boxed is None or not boxed.strip()):
        return 0.0, UNPARSED
    # signal.alarm takes whole seconds; off the main thread signals are unavailable -> no timeout.
    t = max(1, math.ceil(timeout_s)) if threading.current_thread() is threading.main_thread() else None
    gold_text = answer if extract_boxed(answer) is not None else "\\boxed{" + answer + "}"
    try:
        gold = parse(gold_text, parsing_timeout=t, raise_on_error=True)
        pred_text = response if whole else "\\boxed{" + boxed + "}"
        pred = parse(pred_text, parsing_timeout=t, raise_on_error=True)
        if not gold:
            return 0.0, ERROR  # the reference itself is unusable; not the response's fault
        if not pred:
            return 0.0, UNPARSED
        ok = verify(gold, pred, timeout_seconds=t, raise_on_error=True)
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        return 0.0, ERROR
    return (1.0, CORRECT) if ok else (0.0, WRONG)


def _score_chunk(args: tuple[list[str], list[str], float, str]) -> list[tuple[float, str]]:
    responses, answers, timeout_s, mode = args
    return [score_one(r, a, timeout_s, mode) for r, a in zip(responses, answers)]


def default_num_workers() -> int:
    return min(8, multiprocessing.cpu_count())


_pools: dict[int, ProcessPoolExecutor] = {}


def _pool(num_workers: int) -> ProcessPoolExecutor:
    if num_workers not in _pools:
        _pools[num_workers] = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    return _pools[num_workers]


def shutdown_pools() -> None:
    """Close the reward worker pools (also done at interpreter exit)."""
    while _pools:
        _, pool = _pools.popitem()
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_pools)


def score_responses(responses: list[str], answers: list[str], *, num_workers: int = 0,
                    timeout_s: float = 5, mode: str = "boxed") -> tuple[list[float], RewardStats]:
    """Binary rewards for `responses[i]` against `answers[i]`, and the outcome counts.

    num_workers: 0 scores in-process; n > 0 uses a reused pool of n spawned processes
    (`default_num_workers()` = min(8, cpu_count) is a good value for training).
    timeout_s: per math-verify call (parse, verify), rounded up to whole seconds.
    mode: how the final answer is found, "boxed" or "boxed-or-whole" (module docstring).
    """
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {REWARD_MODES}, got {mode!r}")
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    responses, answers = [str(r) for r in responses], [str(a) for a in answers]
    if num_workers == 0 or len(responses) <= 1:
        results = _score_chunk((responses, answers, timeout_s, mode))
    else:
        results = _score_in_pool(responses, answers, num_workers, timeout_s, mode)
    stats = RewardStats(num=len(results))
    for _, outcome in results:
        stats.num_correct += outcome == CORRECT
        stats.num_unparsed += outcome == UNPARSED
        stats.num_errors += outcome == ERROR
    return [score for score, _ in results], stats


def _score_in_pool(responses, answers, num_workers, timeout_s, mode) -> list[tuple[float, str]]:
    # ~4 chunks per worker: few round trips, still balanced when some answers are slow to verify.
    n = len(responses)
    size = max(1, math.ceil(n / (4 * num_workers)))
    chunks = [(responses[i:i + size], answers[i:i + size], timeout_s, mode) for i in range(0, n, size)]
    done: list[list[tuple[float, str]] | None] = [None] * len(chunks)
    # A dead worker (out of memory in sympy, killed) breaks the pool, mid-batch or while idle: rebuild it once
    # and rescore the chunks without a result; what breaks it twice scores 0, counted as errors.
    for attempt in range(2):
        todo = [i for i, d in enumerate(done) if d is None]
        if not todo:
            break
        try:
            futures = {i: _pool(num_workers).submit(_score_chunk, chunks[i]) for i in todo}
        except BrokenProcessPool:
            futures = {}
        for i, fut in futures.items():
            try:
                done[i] = fut.result()
            except BrokenProcessPool:
                pass
        if any(d is None for d in done):
            lost = sum(len(chunks[i][0]) for i, d in enumerate(done) if d is None)
            log.warning("reward worker pool broke; %d responses %s", lost,
                        "are rescored in a new pool" if attempt == 0 else "scored 0 as errors")
            broken = _pools.pop(num_workers, None)
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
    return [r for i, d in enumerate(done) for r in (d if d is not None else [(0.0, ERROR)] * len(chunks[i][0]))]
