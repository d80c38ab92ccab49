"""Evaluation: pass@1 on local benchmark files, as the paper reports it, through the job's rollout backend.

    ceiling eval runs/tiny/sft/hf --benchmarks data/math500.jsonl data/aime24.parquet --samples 16
    ceiling eval runs/tiny/rl/checkpoints/step_00000030            # the RL run's own eval set, seed and reward
    ceiling eval MODEL --benchmarks FILE --set rollout.backend=vllm --set run.device=cuda --dump samples.jsonl

A benchmark is any file (or glob, folder, save_to_disk directory) of prompts with reference answers in a layout
engine/data/layouts.py reads: MATH-500's {problem, solution, answer, ...}, verl's, the engine's {prompt, answer}.
Every prompt is sampled `samples` times at temperature 0.7, top-p 1.0 and scored by the run's reward
(`reward:` section: math-verify, or your function). pass@1 is the mean over the samples of whether each counts
as solved (avg@k when k > 1, as the paper does for small sets such as AIME); with more than one sample, pass@k
(the unbiased estimator) and maj@k (majority vote of the final answers) are reported beside it
(engine/pass_at_k.py), per benchmark and per `data_source`. The overall score weights each benchmark by its
problem count. Scores are in percent, as in the paper's tables. The fraction of samples cut at `max_new_tokens`
and the response-length percentiles say whether the scores are limited by length.

A model is an HF directory (config.json + weights) or a checkpoint directory written by the engine
(checkpoints/step_N); for the latter, the model, tokenizer and reward come from the run's config.yaml, and for an
RL run's checkpoint so do the defaults of every setting its evaluations used (eval set, samples, temperature,
length, batch size, seed: `run.seed + EVAL_SEED_OFFSET`), so the score reproduces the run's logged pass@1 on
the same backend; flags and --set override them. Generation goes through the `Rollout` interface, on the backend
of `rollout.backend` (transformers or vLLM) and the device of `run.device`, exactly as RL's rollouts do: the
backend is built from the base model (`build_rollout`) and a checkpoint's weights reach it through
`sync_weights`, the path RL uses after every update. RL's own held-out evaluations go through the RL run's
rollout, which already holds the current weights; the sweep evaluates all SFT checkpoints of a scene on one
backend; the pipeline scores the base model on a backend built from the base weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.config import EvalConfig, EvalJobConfig, ModelConfig, RolloutConfig
from engine.data.layouts import FieldMap, PromptRow, load_prompt_rows
from engine.data.sft_dataset import encode_prompts
from engine.data.tokenizer import model_tokenizer
from engine.errors import CeilingError
from engine.pass_at_k import ProblemSamples, summarize
from engine.reward import Reward, RewardStats, Score
from engine.rollout import Rollout, SamplingParams, build_rollout
from engine.rollout.build import resolve_backend
from engine.rundir.files import write_json_atomic
from engine.rundir.generations import GenerationRecord, write_generations

log = logging.getLogger("ceiling")

EVAL_SEED_OFFSET = 7
"""RL's held-out evaluations sample with seed `run.seed + 7` (apart from the training rollouts' seeds)."""


def eval_seed(run_seed: int) -> int:
    return run_seed + EVAL_SEED_OFFSET


# ---------------------------------------------------------------- scoring generated samples


@dataclass
class ScoredSample:
    """One generated response and its score."""

    text: str
    n_tokens: int
    finish_reason: str
    score: Score
    response_ids: list[int] | None = None
    """The tokens to train on (RL's rollouts: the generated tokens and the stop token)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank rule; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))])


def length_metrics(lengths: Sequence[int], finish_reasons: Sequence[str]) -> dict[str, float]:
    """Response lengths (tokens, percentiles) and the fraction cut at max_new_tokens (finish reason "length")."""
    return {"truncated_frac": sum(r == "length" for r in finish_reasons) / max(len(finish_reasons), 1),
            "response_len_mean": sum(lengths) / max(len(lengths), 1), "response_len_p50": percentile(lengths, 0.5),
            "response_len_p90": percentile(lengths, 0.9), "response_len_max": float(max(lengths, default=0))}


def summarize_samples(per_prompt: Sequence[Sequence[ScoredSample]], ks: Sequence[int] | None = None
                      ) -> dict[str, float]:
    """pass@1 (the fraction solved), reward_mean, pass@k and maj@k (k > 1: n > 1 samples), truncation and lengths
    of the prompts' samples (fractions, not percent)."""
    flat = [s for samples in per_prompt for s in samples]
    if not flat:
        return {}
    out = {"pass@1": sum(s.score.correct for s in flat) / len(flat),
           "reward_mean": sum(s.score.reward for s in flat) / len(flat)}
    n = len(per_prompt[0])
    if n > 1 and all(len(p) == n for p in per_prompt):
        problems = [ProblemSamples([s.score.reward for s in p], [s.score.correct for s in p],
                                   [s.score.pred for s in p]) for p in per_prompt]
        out.update({k: v for k, v in summarize(problems, ks).items() if k.startswith(("pass@", "maj@"))
                    and k not in ("pass@1", "maj@1")})  # maj@1 is pass@1 with unparsed answers left out
    out.update(length_metrics([s.n_tokens for s in flat], [s.finish_reason for s in flat]))
    out["reward_failed"] = sum(s.score.outcome in ("error", "timeout") for s in flat)
    return out


def summarize_by_source(per_prompt: Sequence[Sequence[ScoredSample]], sources: Sequence[str | None],
                        ks: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """`summarize_samples` per data source (empty when no prompt names one)."""
    if all(s is None for s in sources):
        return {}
    groups: dict[str, list[Sequence[ScoredSample]]] = {}
    for samples, source in zip(per_prompt, sources):
        groups.setdefault(source or "(none)", []).append(samples)
    return {source: summarize_samples(group, ks) for source, group in sorted(groups.items())}


def generation_records(kind: str, step: int, rows: Sequence[PromptRow], prompt_texts: Sequence[str],
                       per_prompt: Sequence[Sequence[ScoredSample]], weight_version: int | None,
                       **extra: Sequence[Any]) -> list[GenerationRecord]:
    """The dump rows of the prompts' samples (`extra`: per-prompt values such as `round` and `kept`)."""
    out = []
    for i, (row, text, samples) in enumerate(zip(rows, prompt_texts, per_prompt)):
        for j, s in enumerate(samples):
            out.append(GenerationRecord(
                kind, step, row.id, j, text, s.text, row.answer, s.score.reward, s.score.correct, s.score.outcome,
                s.score.reason, s.finish_reason, s.n_tokens, weight_version, row.data_source,
                **{k: v[i] for k, v in extra.items()}))
    return out


# ---------------------------------------------------------------- benchmarks


@dataclass
class Benchmark:
    """One benchmark, read and tokenized once (a sweep scores many checkpoints on it)."""

    name: str
    rows: list[PromptRow]
    prompt_ids: list[list[int]]

    @classmethod
    def load(cls, name: str, path, tokenizer, max_prompts: int | None = None, fields: FieldMap | None = None,
             max_prompt_len: int | None = None) -> Benchmark:
        """The first `max_prompts` rows of `path` whose prompts have at most `max_prompt_len` tokens."""
        rows = load_prompt_rows(path, fields, f"benchmark {name}")
        ids = encode_prompts([r.messages for r in rows], tokenizer)
        keep = [i for i, p in enumerate(ids) if max_prompt_len is None or len(p) <= max_prompt_len]
        if len(keep) < len(rows):
            log.warning("benchmark %s: %d of %d prompts are longer than %d tokens and were skipped", name,
                        len(rows) - len(keep), len(rows), max_prompt_len)
        if not keep:
            raise CeilingError(f"benchmark {name} ({path}): every prompt is longer than {max_prompt_len} tokens")
        keep = keep[:max_prompts]
        return cls(name, [rows[i] for i in keep], [ids[i] for i in keep])

    @property
    def answers(self) -> list:
        return [r.answer for r in self.rows]

    @staticmethod
    def max_model_len(benchmarks: list[Benchmark], max_new_tokens: int) -> int:
        return max((len(p) for b in benchmarks for p in b.prompt_ids), default=1) + max_new_tokens


@dataclass
class EvalResult:
    scores: dict[str, float]  # benchmark -> pass@1 in percent
    counts: dict[str, int]  # benchmark -> number of problems
    samples: int
    unparsed: int = 0
    details: dict[str, list[float]] = field(default_factory=dict)  # benchmark -> per-problem mean reward
    backend: str = ""  # the rollout backend that generated the answers
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """benchmark -> summarize_samples (fractions): pass@k, maj@k, reward_mean, truncation, lengths."""
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    """data source -> the same, over every benchmark's prompts that name it."""
    problems: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """benchmark -> per problem: id, data source, answer, rewards and how many samples solved it."""
    records: list[GenerationRecord] = field(default_factory=list)
    """Every sample (what --dump writes)."""
    reward_stats: RewardStats = field(default_factory=RewardStats)

    @property
    def overall(self) -> float:
        """Scores weighted by problem count, rounded to 2 decimals (the RETU rule)."""
        total = sum(self.counts.values())
        return round(sum(self.scores[b] * self.counts[b] for b in self.scores) / max(total, 1), 2)

    def to_dict(self) -> dict[str, object]:
        return {"scores": self.scores, "counts": self.counts, "overall": self.overall, "samples": self.samples,
                "unparsed": self.unparsed, "backend": self.backend, "metrics": self.metrics,
                "by_source": self.by_source, "reward_failed": self.reward_stats.num_failed,
                "reward_failure_reasons": self.reward_stats.reasons, "problems": self.problems}


def evaluate(rollout: Rollout, benchmarks: list[Benchmark], cfg: EvalConfig, seed: int = 0,
             reward: Reward | None = None, step: int = 0) -> EvalResult:
    """pass@1 (avg@cfg.samples), pass@k and maj@k on each benchmark, generated by `rollout` with the weights it holds
    now and scored by `reward` (default: math-verify, boxed)."""
    reward = reward or Reward()
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.samples, seed, logprobs=False)
    result = EvalResult({}, {}, cfg.samples, backend=rollout.backend)
    everything, sources = [], []
    for bench in benchmarks:
        outputs = rollout.generate(bench.prompt_ids, params)
        texts = [o.text for outs in outputs for o in outs]
        rows = [r for r, outs in zip(bench.rows, outputs) for _ in outs]
        scores, stats = reward.score(texts, [r.answer for r in rows], [r.data_source for r in rows],
                                     [r.extra_info for r in rows])
        it = iter(scores)
        per_prompt = [[ScoredSample(o.text, len(o.response_ids()), o.finish_reason, next(it)) for o in outs]
                      for outs in outputs]
        summary = summarize_samples(per_prompt)
        result.scores[bench.name] = round(100.0 * summary["pass@1"], 2)
        result.counts[bench.name] = len(bench.rows)
        result.metrics[bench.name] = summary
        result.details[bench.name] = [sum(s.score.reward for s in p) / len(p) for p in per_prompt]
        result.problems[bench.name] = [
            {"id": r.id, "data_source": r.data_source, "answer": r.answer, "rewards": [s.score.reward for s in p],
             "solved": sum(s.score.correct for s in p), "truncated": sum(s.finish_reason == "length" for s in p)}
            for r, p in zip(bench.rows, per_prompt)]
        prompt_texts = [rollout_prompt_text(rollout, ids) for ids in bench.prompt_ids]
        result.records += generation_records("eval", step, bench.rows, prompt_texts, per_prompt,
                                             rollout.weight_version)
        result.unparsed += stats.num_unparsed
        result.reward_stats = result.reward_stats + stats
        everything += per_prompt
        sources += [r.data_source for r in bench.rows]
    result.by_source = summarize_by_source(everything, sources)
    result.reward_stats.warn("evaluation")
    return result


def rollout_prompt_text(rollout: Rollout, ids: list[int]) -> str:
    tokenizer = getattr(rollout, "tokenizer", None)
    return tokenizer.decode(ids) if tokenizer is not None else ""


# ---------------------------------------------------------------- models and checkpoints


def checkpoint_run_config(path: str | Path) -> dict | None:
    """The resolved config of the run that wrote checkpoint `path` (runs/<name>/checkpoints/step_N ->
    runs/<name>/config.yaml), or None outside a run directory."""
    run_cfg = Path(path).parent.parent / "config.yaml"
    return yaml.safe_load(run_cfg.read_text()) if run_cfg.is_file() else None


def checkpoint_model_config(path: str | Path, model_config: str | None = None,
                            tokenizer: str | None = None) -> ModelConfig:
    """The model section of the run that wrote checkpoint `path`, or the one given: the base the checkpoint's
    weights are loaded into."""
    path = Path(path)
    chat_template = None
    if model_config is None or tokenizer is None:
        run = checkpoint_run_config(path)
        if run is None:
            raise CeilingError(f"{path}: pass --model-config and --tokenizer (no run config at "
                               f"{path.parent.parent / 'config.yaml'})")
        section = run["model"]
        model_config = model_config or section.get("path") or section["config"]
        tokenizer = tokenizer or section.get("tokenizer") or section.get("path")
        chat_template = section.get("chat_template")
    cfg_path = Path(model_config)
    if cfg_path.is_dir():
        return ModelConfig(path=str(cfg_path), tokenizer=tokenizer, chat_template=chat_template)
    return ModelConfig(config=str(cfg_path), tokenizer=tokenizer, chat_template=chat_template)


def load_checkpoint_model(path: str | Path, model_cfg: ModelConfig, device: torch.device | str = "cpu"):
    """The HF model of an engine checkpoint (torch.distributed.checkpoint, any world size), on `device`."""
    import torch.distributed.checkpoint as dcp

    from engine.models import PackedCausalLM, build_model

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CeilingError(f"{path}: neither an HF model directory (config.json) nor a checkpoint (.metadata)")
    config = model_cfg.config or str(Path(model_cfg.path) / "config.json")
    hf = build_model(config=config)
    wrapper = PackedCausalLM(hf)
    state = {"model": wrapper.state_dict()}
    dcp.load(state, checkpoint_id=str(path))  # loads in place into the plain tensors
    return hf.to(device).eval()


def eval_rollout(rollout_cfg: RolloutConfig, model_cfg: ModelConfig, tokenizer, info, *, workdir: str | Path,
                 seed: int, max_model_len: int, batch_size: int) -> Rollout:
    """A rollout backend for evaluation, holding `model_cfg`'s weights (checkpoints arrive by `sync_weights`).

    vLLM sizes the engine for evaluation alone: no sleep (nothing trains beside it)."""
    rollout_cfg = resolve_backend(rollout_cfg)
    if rollout_cfg.backend == "vllm":
        rollout_cfg = replace(rollout_cfg, sleep_level=0)
    return build_rollout(rollout_cfg, model_cfg, tokenizer, info, workdir=workdir, seed=seed,
                         max_model_len=max_model_len, hf_batch_size=batch_size)


# ---------------------------------------------------------------- the command


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="pass@1, pass@k and maj@k of a model or checkpoint on benchmark files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF model directory or engine checkpoint directory")
    p.add_argument("--benchmarks", nargs="+", metavar="PATH",
                   help="files (globs, folders, save_to_disk dirs) of prompts with answers; each names a benchmark "
                        "by its stem; default for an RL run's checkpoint: that run's eval set")
    # Shorthands for the eval section (`--set eval.KEY=VALUE` sets the same).
    p.add_argument("--samples", type=int, help="eval.samples: samples per problem (avg@k, pass@k, maj@k); default 1")
    p.add_argument("--temperature", type=float, help="eval.temperature; default 0.7")
    p.add_argument("--top-p", type=float, help="eval.top_p; default 1.0")
    p.add_argument("--max-new-tokens", type=int, help="eval.max_new_tokens; default 1024")
    p.add_argument("--max-prompts", type=int, help="eval.max_prompts: first N problems of each file")
    p.add_argument("--batch-size", type=int, help="eval.batch_size (transformers backend); default 64")
    p.add_argument("--reward", dest="reward_function", metavar="FILE.py:FUNCTION",
                   help="reward.function: your reward (verl's signature); default math-verify")
    p.add_argument("--seed", type=int, help="run.seed: the sampling seed; default 0")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a run.device, rollout.*, eval.*, reward.* or data.fields.* value, e.g. --set "
                        "rollout.backend=vllm (repeatable)")
    p.add_argument("--model-config", default=None, help="HF config.json (or HF dir) for a checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="'char' or a tokenizer directory")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the result as JSON (scores, pass@k, maj@k, per source, per problem)")
    p.add_argument("--dump", default=None, metavar="FILE.jsonl",
                   help="write every sample (prompt, response, answer, reward and its reason, finish reason)")
    p.add_argument("--dump-max-rows", type=int, default=100_000, help="at most this many rows in --dump")
    p.set_defaults(func=main)


_SHORTHANDS = {"samples": "eval.samples", "temperature": "eval.temperature", "top_p": "eval.top_p",
               "max_new_tokens": "eval.max_new_tokens", "max_prompts": "eval.max_prompts",
               "batch_size": "eval.batch_size", "reward_function": "reward.function", "seed": "run.seed"}


def run_defaults(run: dict | None, run_dir: Path | None) -> tuple[list[str], list[str]]:
    """(--set overrides, benchmark paths) that an RL run's evaluations used, from its config.yaml; the reward and
    the field mapping of any run."""
    if run is None:
        return [], []
    sets = []
    for key in ("function", "workers", "timeout_s"):
        if run.get("reward", {}).get(key) is not None:
            sets.append(f"reward.{key}={run['reward'][key]}")
    for key, value in ((run.get("data") or {}).get("fields") or {}).items():
        if value is not None:
            sets.append(f"data.fields.{key}={value}")
    rl = run.get("rl")
    if rl is None:
        if run.get("reward", {}).get("mode"):
            sets.append(f"reward.mode={run['reward']['mode']}")
        return sets, []
    from engine.rl.algorithms import ALGORITHMS

    mode = run.get("reward", {}).get("mode") or ALGORITHMS[rl["algorithm"]].reward_mode
    sets += [f"reward.mode={mode}", f"eval.samples={rl['eval_samples']}", f"eval.temperature={rl['eval_temperature']}",
             f"eval.max_new_tokens={rl['max_new_tokens']}", f"eval.batch_size={rl['rollout_batch_size']}",
             f"eval.max_prompt_len={rl['max_prompt_len']}", f"run.seed={eval_seed(run['run']['seed'])}"]
    if rl.get("eval_max_prompts"):
        sets.append(f"eval.max_prompts={rl['eval_max_prompts']}")
    sets += [f"rollout.{key}={json.dumps(value)}" for key, value in (run.get("rollout") or {}).items()]
    eval_path = rl.get("eval_path")
    if eval_path is None and run_dir is not None and (run_dir / "data" / "eval.jsonl").is_file():
        eval_path = str(run_dir / "data" / "eval.jsonl")
    return sets, ([eval_path] if isinstance(eval_path, str) else list(eval_path or []))


def eval_job(args: argparse.Namespace, defaults: Sequence[str] = ()) -> EvalJobConfig:
    from engine.config import load_config

    flags = [f"{key}={getattr(args, name)}" for name, key in _SHORTHANDS.items() if getattr(args, name) is not None]
    return load_config(None, EvalJobConfig, list(defaults) + flags + list(args.overrides))


def _print(result: EvalResult, job: EvalJobConfig, device: str) -> None:
    width = max(len(n) for n in [*result.scores, "overall"])
    for name, score in result.scores.items():
        m = result.metrics[name]
        extra = "  ".join(f"{k} {100 * v:.2f}%" for k, v in m.items() if k.startswith(("pass@", "maj@")) and k != "pass@1")
        print(f"{name:<{width}}  {score:6.2f}%  ({result.counts[name]} problems, {job.eval.samples} samples each; "
              f"{100 * m['truncated_frac']:.1f}% cut at {job.eval.max_new_tokens} tokens, length p50 "
              f"{m['response_len_p50']:.0f} p90 {m['response_len_p90']:.0f})" + (f"  {extra}" if extra else ""))
    for source, m in result.by_source.items():
        print(f"  {source}: pass@1 {100 * m['pass@1']:.2f}%" + "".join(
            f", {k} {100 * v:.2f}%" for k, v in m.items() if k.startswith(("pass@", "maj@")) and k != "pass@1"))
    print(f"{'overall':<{width}}  {result.overall:6.2f}%  (weighted by problem count; {result.unparsed} unparsed, "
          f"{result.reward_stats.num_failed} scoring failures; generated by the {result.backend} backend on {device}, "
          f"scored by {job_reward(job).describe()})")


def job_reward(job: EvalJobConfig) -> Reward:
    return Reward.of(job.reward)


def main(args: argparse.Namespace) -> int:
    from engine.distributed import destroy_distributed, init_distributed

    model = Path(args.model)
    checkpoint = None
    if (model / "config.json").is_file():  # an HF directory; a run's own `<run>/hf` brings the run's settings
        model_cfg = ModelConfig(path=str(model), tokenizer=args.tokenizer or str(model))
        run_dir = model.resolve().parent if model.name == "hf" else None
    else:
        checkpoint = model
        model_cfg = checkpoint_model_config(model, args.model_config, args.tokenizer)
        run_dir = model.parent.parent
    run_file = run_dir / "config.yaml" if run_dir is not None else None
    run = yaml.safe_load(run_file.read_text()) if run_file is not None and run_file.is_file() else None
    defaults, run_benchmarks = run_defaults(run, run_dir)
    if defaults:
        print(f"settings from {run_file} (flags and --set override them): {' '.join(defaults)}")
    job = eval_job(args, defaults)
    paths = args.benchmarks or run_benchmarks
    if not paths:
        raise CeilingError("eval: name the benchmark files with --benchmarks (only an RL run's checkpoint brings its "
                           "own eval set)")
    tokenizer = model_tokenizer(model_cfg)
    names: dict[str, str] = {}
    for path in paths:
        stem = Path(path).stem if not Path(path).is_dir() else Path(path).name
        if stem in names:
            raise CeilingError(f"two benchmarks are named {stem!r}: {names[stem]} and {path}")
        names[stem] = path
    benchmarks = [Benchmark.load(n, f, tokenizer, job.eval.max_prompts, job.data.fields, job.eval.max_prompt_len)
                  for n, f in names.items()]
    reward = job_reward(job)
    info = init_distributed(job.run.device)
    with tempfile.TemporaryDirectory(prefix="ceiling-eval-") as workdir:
        rollout = eval_rollout(job.rollout, model_cfg, tokenizer, info, workdir=workdir, seed=job.run.seed,
                               max_model_len=Benchmark.max_model_len(benchmarks, job.eval.max_new_tokens),
                               batch_size=job.eval.batch_size)
        try:
            if checkpoint is not None:
                rollout.sync_weights(load_checkpoint_model(checkpoint, model_cfg), version=1)
            result = evaluate(rollout, benchmarks, job.eval, seed=job.run.seed, reward=reward)
        finally:
            rollout.close()
            destroy_distributed()
    _print(result, job, info.device.type)
    if args.json:
        write_json_atomic(args.json, result.to_dict())
    if args.dump:
        write_generations(args.dump, result.records, args.dump_max_rows)
        print(f"samples: {args.dump} ({min(len(result.records), args.dump_max_rows)} of {len(result.records)} rows)")
    return 0
