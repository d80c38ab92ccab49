"""Verifiable reward: math-verify on the response's final answer (binary 1.0 / 0.0), or the user's function.

    R(response, answer) = 1.0  if verify(parse(answer), parse(final answer of response)) else 0.0

The final answer (`mode`):
    "boxed"           the last `\\boxed{...}` (balanced braces) of the response, wrapped again as `\\boxed{...}`
                      so that math-verify extracts exactly that span. No `\\boxed` -> unparsed.
    "boxed-or-whole"  the same when the response has a `\\boxed`; without one, math-verify's default extraction
                      over the whole response (LaTeX and plain expressions, e.g. "The answer is 5." -> 5). This
                      is the behaviour of RETU's reward (`my_reward_fn` -> `default_accuracy_reward`, which first
                      runs `parse(content)` on the whole response), without its Levenshtein string fallback (a
                      fuzzy ratio > 0.6 counts as correct there), which is not ported.
In both modes a response whose last `\\boxed{` never closes (cut off inside its answer, e.g. at the length
limit) gets no credit: an earlier complete `\\boxed{}` is a discarded draft, not the answer.
The reference answer is wrapped as `\\boxed{...}` unless it already holds one; a list of references (verl's
`ground_truth` may be one) is correct when any of them is. Equivalent forms score 1 (`\\frac{1}{2}` vs `0.5`,
`x^2+1` vs `1+x^2`), which string matching would miss.

Your own reward (`reward.function: path/to/file.py:name`) is called as verl calls one:

    name(data_source, solution_str, ground_truth, extra_info) -> float | {"score": float, "acc": bool?, "pred": str?}

`acc` says whether the response counts as solved (pass@k, maj@k); without it, a score > 0 does. `pred` is the
answer maj@k votes on; without it, the last `\\boxed{}`'s content. The module is imported once per process.

Outcomes, counted in `RewardStats` and never raised (a failure scores 0 and the run goes on):
    correct     verify() is true (math-verify), or the function's response counts as solved -> 1.0 / its score
    wrong       parsed, not equivalent (math-verify), or not solved (the function)          -> 0.0 / its score
    unparsed    no usable answer (see the modes), or math-verify extracts nothing           -> 0.0
    error       an exception inside math-verify or the function, or a return that is not a number -> 0.0
    timeout     the function ran past `timeout_s` (math-verify's own timeouts count as errors) -> 0.0
A `Score` keeps the reason of an error or timeout (the exception's text); `RewardStats.reasons` keeps a few.

Why processes: math-verify's timeouts (`parse(parsing_timeout=)`, `verify(timeout_seconds=)`) and the function's
use SIGALRM, which only works in a process's main thread. `num_workers > 0` scores in a `ProcessPoolExecutor`
(spawn context: no fork of a process holding CUDA / NCCL threads) whose workers run each call in their main
thread, so timeouts hold and the work runs on several cores. The pool is kept per worker count and reused across
calls (spawning costs ~1-2 s); `shutdown_pools()` closes them. A worker stuck outside Python (a C extension that
ignores signals) past its chunk's time is killed with its pool; its responses score 0 as timeouts.
`num_workers=0` scores in-process (tests, small batches); off the main thread it runs without timeouts. A
function that sets its own SIGALRM timer (math-verify's timeouts do) holds the timer while it runs.

    scores, stats = score_responses(responses, answers, num_workers=8, timeout_s=5, mode="boxed-or-whole")
    results, stats = Reward(function="my_reward.py:compute_score").score(responses, answers, sources, infos)
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import importlib.util
import logging
import math
import multiprocessing
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

log = logging.getLogger("ceiling")

__all__ = ["REWARD_MODES", "Reward", "RewardStats", "Score", "default_num_workers", "extract_boxed", "has_boxed",
           "load_reward_function", "score_one", "score_responses", "shutdown_pools"]

REWARD_MODES = ("boxed", "boxed-or-whole")

CORRECT, WRONG, UNPARSED, ERROR, TIMEOUT = "correct", "wrong", "unparsed", "error", "timeout"
_BOXED = ("\\boxed{", "\\fbox{")
MAX_REASONS = 5  # distinct error reasons a RewardStats keeps for the log
STUCK_SLACK_S = 60.0  # beyond a chunk's summed timeouts, before its worker counts as stuck outside Python


@dataclass
class Score:
    """One response's reward, whether it counts as solved, its outcome, and why it scored 0 when that was not its
    answer's fault (`reason`); `pred` is the final answer maj@k votes on (None: none found)."""

    reward: float
    correct: bool
    outcome: str
    reason: str = ""
    pred: str | None = None


@dataclass
class RewardStats:
    """Counts over one call of `score_responses`; `num == correct + wrong + unparsed + errors + timeouts`."""

    num: int = 0
    num_correct: int = 0
    num_unparsed: int = 0
    num_errors: int = 0
    num_timeouts: int = 0
    reasons: list[str] = field(default_factory=list)
    """Up to MAX_REASONS distinct reasons of errors and timeouts, for the log."""

    def __post_init__(self):
        counts = (self.num, self.num_correct, self.num_unparsed, self.num_errors, self.num_timeouts)
        if min(counts) < 0:
            raise ValueError(f"RewardStats counts must be >= 0, got {self}")
        if sum(counts[1:]) > self.num:
            raise ValueError(f"RewardStats outcome counts exceed num: {self}")

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num if self.num else 0.0

    @property
    def num_failed(self) -> int:
        """Responses scored 0 because scoring failed (errors and timeouts), not because of their answers."""
        return self.num_errors + self.num_timeouts

    def __add__(self, other: RewardStats) -> RewardStats:
        reasons = list(dict.fromkeys(self.reasons + other.reasons))[:MAX_REASONS]
        return RewardStats(self.num + other.num, self.num_correct + other.num_correct,
                           self.num_unparsed + other.num_unparsed, self.num_errors + other.num_errors,
                           self.num_timeouts + other.num_timeouts, reasons)

    @classmethod
    def of(cls, scores: Sequence[Score]) -> RewardStats:
        return cls(len(scores), sum(s.correct for s in scores), sum(s.outcome == UNPARSED for s in scores),
                   sum(s.outcome == ERROR for s in scores), sum(s.outcome == TIMEOUT for s in scores),
                   list(dict.fromkeys(s.reason for s in scores if s.reason))[:MAX_REASONS])

    def warn(self, what: str) -> None:
        """Log the responses that scored 0 because scoring failed (nothing when none did)."""
        if self.num_failed:
            log.warning("reward (%s): %d of %d responses scored 0 because scoring failed (%d errors, %d timeouts): "
                        "%s", what, self.num_failed, self.num, self.num_errors, self.num_timeouts,
                        "; ".join(self.reasons))


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


def _vote_key(text: str | None) -> str | None:
    return " ".join(text.split()) if text is not None and text.strip() else None


# ---------------------------------------------------------------- math-verify


def _math_verify(response: str, answer: str | Sequence[str], timeout_s: float, mode: str) -> Score:
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    whole = mode == "boxed-or-whole" and not has_boxed(response)
    boxed = extract_boxed(response)
    if not whole and (boxed is None or not boxed.strip()):
        return Score(0.0, False, UNPARSED)
    # signal.alarm takes whole seconds; off the main thread signals are unavailable -> no timeout.
    t = max(1, math.ceil(timeout_s)) if threading.current_thread() is threading.main_thread() else None
    golds = [answer] if isinstance(answer, str) else list(answer)
    try:
        pred_text = response if whole else "\\boxed{" + boxed + "}"
        pred = parse(pred_text, parsing_timeout=t, raise_on_error=True)
        key = _vote_key(str(pred[0]) if pred else None)
        ok, usable = False, False
        for text in golds:
            gold = parse(text if extract_boxed(text) is not None else "\\boxed{" + text + "}", parsing_timeout=t,
                         raise_on_error=True)
            usable = usable or bool(gold)
            if gold and pred and verify(gold, pred, timeout_seconds=t, raise_on_error=True):
                ok = True
                break
        if not usable:  # the reference itself is unusable; not the response's fault
            return Score(0.0, False, ERROR, f"math-verify cannot parse the reference answer {answer!r}", key)
        if not pred:
            return Score(0.0, False, UNPARSED)
    except (Exception, TimeoutException) as exc:  # TimeoutException derives from BaseException
        return Score(0.0, False, ERROR, f"math-verify: {type(exc).__name__}: {exc}"[:300])
    return Score(1.0, True, CORRECT, pred=key) if ok else Score(0.0, False, WRONG, pred=key)


def score_one(response: str, answer: str, timeout_s: float = 5, mode: str = "boxed") -> tuple[float, str]:
    """(reward, outcome) for one response under math-verify; outcome is "correct" | "wrong" | "unparsed" | "error"."""
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {REWARD_MODES}, got {mode!r}")
    result = _math_verify(response, answer, timeout_s, mode)
    return result.reward, result.outcome


# ---------------------------------------------------------------- the user's function


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise `_Timeout` inside the block after `seconds` (SIGALRM: main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_functions: dict[str, Any] = {}


def load_reward_function(spec: str):
    """The function `name` of `path/to/file.py:name`, imported once per process (a clear error if it is not
    there)."""
    if spec in _functions:
        return _functions[spec]
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"reward.function: {file} does not exist (relative to the working directory {Path.cwd()})")
    module_name = f"ceiling_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so that pickling and dataclasses inside it work
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"reward.function: importing {file} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward.function: {file} has no function {name!r}")
    _functions[spec] = fn
    return fn


def _interpret(value: Any, response: str) -> Score:
    """A Score from what the user's function returned: a number, or a dict with `score` (`acc`, `pred`)."""
    acc, pred = None, None
    if isinstance(value, dict):
        if "score" not in value:
            return Score(0.0, False, ERROR, f"returned a dict without 'score' (keys {sorted(value)})")
        acc, pred = value.get("acc"), value.get("pred")
        value = value["score"]
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return Score(0.0, False, ERROR, f"returned {type(value).__name__} {value!r:.60}; expected a number")
    if not math.isfinite(reward):
        return Score(0.0, False, ERROR, f"returned {reward}")
    correct = bool(acc) if acc is not None else reward > 0
    key = _vote_key(str(pred)) if pred is not None else _vote_key(extract_boxed(response))
    return Score(reward, correct, CORRECT if correct else WRONG, pred=key)


def _call_function(spec: str, source, response: str, answer, extra, timeout_s: float) -> Score:
    fn = load_reward_function(spec)
    try:
        with _time_limit(timeout_s):
            value = fn(source, response, answer, extra)
    except _Timeout:
        return Score(0.0, False, TIMEOUT, f"{spec} ran past reward.timeout_s={timeout_s:g}s")
    except Exception as exc:
        return Score(0.0, False, ERROR, f"{spec} raised {type(exc).__name__}: {exc}"[:300])
    return _interpret(value, response)


# ---------------------------------------------------------------- scoring many


@dataclass(frozen=True)
class _Task:
    responses: list[str]
    answers: list[Any]
    sources: list[Any]
    extras: list[Any]
    function: str | None
    mode: str
    timeout_s: float


def _score_chunk(task: _Task) -> list[Score]:
    if task.function is None:
        return [_math_verify(r, a, task.timeout_s, task.mode) for r, a in zip(task.responses, task.answers)]
    return [_call_function(task.function, s, r, a, e, task.timeout_s)
            for r, a, s, e in zip(task.responses, task.answers, task.sources, task.extras)]


def default_num_workers() -> int:
    return min(8, multiprocessing.cpu_count())


_pools: dict[int, ProcessPoolExecutor] = {}


def _pool(num_workers: int) -> ProcessPoolExecutor:
    if num_workers not in _pools:
        _pools[num_workers] = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    return _pools[num_workers]


def _drop_pool(num_workers: int, kill: bool = False) -> None:
    pool = _pools.pop(num_workers, None)
    if pool is None:
        return
    if kill:  # a worker stuck in C code never returns: end the processes, not just the pool's bookkeeping
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown_pools() -> None:
    """Close the reward worker pools (also done at interpreter exit)."""
    while _pools:
        _, pool = _pools.popitem()
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_pools)


def score_all(responses: Sequence[str], answers: Sequence[Any], *, data_sources: Sequence[Any] | None = None,
              extra_infos: Sequence[Any] | None = None, function: str | None = None, num_workers: int = 0,
              timeout_s: float = 5, mode: str = "boxed") -> tuple[list[Score], RewardStats]:
    """A `Score` for `responses[i]` against `answers[i]` (with its data source and extra info for a function)."""
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {REWARD_MODES}, got {mode!r}")
    n = len(responses)
    if len(answers) != n:
        raise ValueError(f"{n} responses but {len(answers)} answers")
    sources = list(data_sources) if data_sources is not None else [None] * n
    extras = list(extra_infos) if extra_infos is not None else [None] * n
    if len(sources) != n or len(extras) != n:
        raise ValueError(f"{n} responses but {len(sources)} data sources and {len(extras)} extra infos")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if function is not None:
        load_reward_function(function)  # a missing file or function is an error now, not a 0 for every response
    answers = [str(a) if not isinstance(a, list | tuple) else [str(x) for x in a] for a in answers]
    task = _Task([str(r) for r in responses], answers, sources, extras, function, mode, timeout_s)
    if num_workers == 0 or n <= 1:
        results = _score_chunk(task)
    else:
        results = _score_in_pool(task, num_workers)
    return results, RewardStats.of(results)


def score_responses(responses: Sequence[str], answers: Sequence[Any], *, num_workers: int = 0,
                    timeout_s: float = 5, mode: str = "boxed") -> tuple[list[float], RewardStats]:
    """Binary math-verify rewards for `responses[i]` against `answers[i]`, and the outcome counts.

    num_workers: 0 scores in-process; n > 0 uses a reused pool of n spawned processes
    (`default_num_workers()` = min(8, cpu_count) is a good value for training).
    timeout_s: per math-verify call (parse, verify), rounded up to whole seconds.
    mode: how the final answer is found, "boxed" or "boxed-or-whole" (module docstring).
    """
    results, stats = score_all(responses, answers, num_workers=num_workers, timeout_s=timeout_s, mode=mode)
    return [r.reward for r in results], stats


def _score_in_pool(task: _Task, num_workers: int) -> list[Score]:
    # ~4 chunks per worker: few round trips, still balanced when some answers are slow to verify.
    n = len(task.responses)
    size = max(1, math.ceil(n / (4 * num_workers)))
    chunks = [_Task(task.responses[i:i + size], task.answers[i:i + size], task.sources[i:i + size],
                    task.extras[i:i + size], task.function, task.mode, task.timeout_s) for i in range(0, n, size)]
    done: list[list[Score] | None] = [None] * len(chunks)
    # A dead worker (out of memory in sympy, killed) breaks the pool, mid-batch or while idle: rebuild it once
    # and rescore the chunks without a result; what breaks it twice scores 0, counted as errors. A chunk past its
    # time (every response's timeout, plus slack: the timeouts run inside the worker) is stuck outside Python.
    for attempt in range(2):
        todo = [i for i, d in enumerate(done) if d is None]
        if not todo:
            break
        try:
            futures = {i: _pool(num_workers).submit(_score_chunk, chunks[i]) for i in todo}
        except BrokenProcessPool:
            futures = {}
        stuck = False
        for i, fut in futures.items():
            limit = None if stuck else 4 * task.timeout_s * len(chunks[i].responses) + STUCK_SLACK_S
            try:
                done[i] = fut.result(timeout=limit)
            except concurrent.futures.TimeoutError:
                stuck = True
                seconds = limit
                done[i] = [Score(0.0, False, TIMEOUT, f"a reward worker gave no answer in {seconds:.0f}s (stuck "
                                 "outside Python?); its pool was restarted")] * len(chunks[i].responses)
            except (BrokenProcessPool, concurrent.futures.CancelledError):
                pass
        if stuck:
            _drop_pool(num_workers, kill=True)
        if any(d is None for d in done):
            lost = sum(len(chunks[i].responses) for i, d in enumerate(done) if d is None)
            log.warning("reward worker pool broke; %d responses %s", lost,
                        "are rescored in a new pool" if attempt == 0 else "scored 0 as errors")
            _drop_pool(num_workers)
    return [r for i, d in enumerate(done) for r in (
        d if d is not None else [Score(0.0, False, ERROR, "the reward worker pool broke twice")] *
        len(chunks[i].responses))]


@dataclass(frozen=True)
class Reward:
    """The run's reward: math-verify in `mode`, or the user's `function` (engine/config/sections.py RewardConfig)."""

    function: str | None = None
    mode: str = "boxed"
    workers: int = 0
    timeout_s: float = 5.0

    @classmethod
    def of(cls, cfg, default_mode: str = "boxed") -> Reward:
        """From a `reward:` section; `default_mode` (the RL algorithm's) where the section leaves mode unset."""
        function = str(Path(cfg.function.rsplit(":", 1)[0]).resolve()) + ":" + cfg.function.rsplit(":", 1)[1] \
            if cfg.function else None  # absolute: spawned workers and later processes import the same file
        return cls(function, cfg.mode or default_mode, cfg.workers, cfg.timeout_s)

    def describe(self) -> str:
        return f"{self.function}" if self.function else f"math-verify ({self.mode})"

    def score(self, responses: Sequence[str], answers: Sequence[Any], data_sources: Sequence[Any] | None = None,
              extra_infos: Sequence[Any] | None = None) -> tuple[list[Score], RewardStats]:
        return score_all(responses, answers, data_sources=data_sources, extra_infos=extra_infos,
                         function=self.function, num_workers=self.workers, timeout_s=self.timeout_s, mode=self.mode)
