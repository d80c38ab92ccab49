"""Verifiable reward: math-verify on the response's final `\\boxed{...}` answer, binary 1.0 / 0.0.

    R(response, answer) = 1.0  if verify(parse(answer), parse(last \\boxed{...} of response)) else 0.0

Only the last `\\boxed{...}` (balanced braces) of the response is judged, wrapped again as
`\\boxed{...}` so that math-verify extracts exactly that span; the reference answer is wrapped the
same way unless it already holds a `\\boxed{}`. Equivalent forms score 1 (`\\frac{1}{2}` vs `0.5`,
`x^2+1` vs `1+x^2`), which string matching would miss.

Outcomes, counted in `RewardStats` and never raised:
    correct     verify() is true                                        -> 1.0
    wrong       parsed, not equivalent                                  -> 0.0
    unparsed    no balanced `\\boxed{}`, or math-verify extracts nothing  -> 0.0
    error       an exception or timeout inside math-verify (response or reference side) -> 0.0

Why processes: math-verify's timeouts (`parse(parsing_timeout=)`, `verify(timeout_seconds=)`) use
`signal.alarm`, which only works in a process's main thread. `num_workers > 0` scores in a
`ProcessPoolExecutor` (spawn context: no fork of a process holding CUDA / NCCL threads) whose workers
run each call in their main thread, so timeouts hold and sympy runs on several cores. The pool is kept
per worker count and reused across calls (spawning costs ~1-2 s); `shutdown_pools()` closes them.
`num_workers=0` scores in-process (tests, small batches); off the main thread it runs without timeouts.

    scores, stats = score_responses(responses, answers, num_workers=8, timeout_s=5)
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

__all__ = ["RewardStats", "default_num_workers", "extract_boxed", "score_one", "score_responses",
           "shutdown_pools"]

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
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces balance, else None.

    Scans the openings from the end; an unbalanced one (a response cut off inside its answer) is
    skipped and the previous balanced one is taken.
    """
    if not text:
        return None
    starts = sorted((i for tag in _BOXED for i in _find_all(text, tag)), reverse=True)
    for i in starts:
        open_at = text.index("{", i)
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


def _find_all(text: str, sub: str):
    i = text.find(sub)
    while i != -1:
        yield i
        i = text.find(sub, i + 1)


def score_one(response: str, answer: str, timeout_s: float = 5) -> tuple[float, str]:
    """(reward, outcome) for one response; outcome is "correct" | "wrong" | "unparsed" | "error"."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    boxed = extract_boxed(response)
    if boxed is None or not boxed.strip():
        return 0.0, UNPARSED
    # signal.alarm takes whole seconds; off the main thread signals are unavailable -> no timeout.
    t = max(1, math.ceil(timeout_s)) if threading.current_thread() is threading.main_thread() else None
    gold_text = answer if extract_boxed(answer) is not None else "\\boxed{" + answer + "}"
    try:
        gold = parse(gold_text, parsing_timeout=t, raise_on_error=True)
        pred = parse("\\boxed{" + boxed + "}", parsing_timeout=t, raise_on_error=True)
        if not gold:
            return 0.0, ERROR  # the reference itself is unusable; not the response's fault
        if not pred:
            return 0.0, UNPARSED
        ok = verify(gold, pred, timeout_seconds=t, raise_on_error=True)
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        return 0.0, ERROR
    return (1.0, CORRECT) if ok else (0.0, WRONG)


def _score_chunk(args: tuple[list[str], list[str], float]) -> list[tuple[float, str]]:
    responses, answers, timeout_s = args
    return [score_one(r, a, timeout_s) for r, a in zip(responses, answers)]


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
                    timeout_s: float = 5) -> tuple[list[float], RewardStats]:
    """Binary rewards for `responses[i]` against `answers[i]`, and the outcome counts.

    num_workers: 0 scores in-process; n > 0 uses a reused pool of n spawned processes
    (`default_num_workers()` = min(8, cpu_count) is a good value for training).
    timeout_s: per math-verify call (parse, verify), rounded up to whole seconds.
    """
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    responses, answers = [str(r) for r in responses], [str(a) for a in answers]
    if num_workers == 0 or len(responses) <= 1:
        results = _score_chunk((responses, answers, timeout_s))
    else:
        results = _score_in_pool(responses, answers, num_workers, timeout_s)
    stats = RewardStats(num=len(results))
    for _, outcome in results:
        stats.num_correct += outcome == CORRECT
        stats.num_unparsed += outcome == UNPARSED
        stats.num_errors += outcome == ERROR
    return [score for score, _ in results], stats


def _score_in_pool(responses, answers, num_workers, timeout_s) -> list[tuple[float, str]]:
    # ~4 chunks per worker: few round trips, still balanced when some answers are slow to verify.
    n = len(responses)
    size = max(1, math.ceil(n / (4 * num_workers)))
    chunks = [(responses[i:i + size], answers[i:i + size], timeout_s) for i in range(0, n, size)]
    pool = _pool(num_workers)
    futures = [pool.submit(_score_chunk, c) for c in chunks]
    results: list[tuple[float, str]] = []
    for chunk, fut in zip(chunks, futures):
        try:
            results.extend(fut.result())
        except BrokenProcessPool:
            # A worker died (e.g. out of memory in sympy): its chunk scores 0 as errors; the pool is rebuilt.
            log.warning("reward worker pool broke; %d responses scored 0 as errors", len(chunk[0]))
            broken = _pools.pop(num_workers, None)
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            results.extend((0.0, ERROR) for _ in chunk[0])
    return results
