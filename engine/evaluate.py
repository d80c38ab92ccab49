"""Evaluation: pass@1 on local benchmark files, as the paper reports it.

    ceiling eval runs/tiny/hf --benchmarks data/gsm8k.jsonl data/math.jsonl --samples 4
    ceiling eval runs/tiny/checkpoints/step_00000300 --benchmarks runs/tiny/data/eval.jsonl

Each benchmark is a JSONL/Parquet file of {prompt, answer, id?} rows (the RL prompt format). Every prompt
is sampled `samples` times at temperature 0.7, top-p 1.0; pass@1 is the mean reward over the samples
(avg@k when k > 1, as the paper does for small sets such as AIME). The overall score weights each
benchmark by its problem count. Scores are in percent, as in the paper's tables.

A model is an HF directory (config.json + weights) or a checkpoint directory written by the engine
(checkpoints/step_N); for the latter, the model and tokenizer come from the run's config.yaml.
Generation uses the rollout interface (the transformers backend here; vLLM where installed).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from engine.data.sft_dataset import encode_prompts, load_prompt_rows
from engine.data.tokenizer import load_tokenizer
from engine.errors import CeilingError
from engine.reward import score_responses
from engine.rollout import SamplingParams
from engine.rollout.hf import HFRollout

log = logging.getLogger("ceiling")


@dataclass
class EvalResult:
    scores: dict[str, float]  # benchmark -> pass@1 in percent
    counts: dict[str, int]  # benchmark -> number of problems
    samples: int
    unparsed: int = 0
    details: dict[str, list[float]] = field(default_factory=dict)  # benchmark -> per-problem mean reward

    @property
    def overall(self) -> float:
        """Scores weighted by problem count, rounded to 2 decimals (the RETU rule)."""
        total = sum(self.counts.values())
        return round(sum(self.scores[b] * self.counts[b] for b in self.scores) / max(total, 1), 2)

    def to_dict(self) -> dict[str, object]:
        return {"scores": self.scores, "counts": self.counts, "overall": self.overall, "samples": self.samples,
                "unparsed": self.unparsed}


def evaluate_model(model, tokenizer, benchmarks: dict[str, str | Path], *, samples: int = 1,
                   temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 1024, seed: int = 0,
                   batch_size: int = 64, reward_workers: int = 0, max_prompts: int | None = None,
                   device: torch.device | str = "cpu") -> EvalResult:
    """pass@1 (avg@samples) of an HF causal LM on each benchmark file."""
    rollout = HFRollout(model, tokenizer, device, batch_size=batch_size)
    params = SamplingParams(temperature, top_p, max_new_tokens, samples, seed)
    result = EvalResult({}, {}, samples)
    for name, path in benchmarks.items():
        rows = load_prompt_rows(path)[:max_prompts]
        outputs = rollout.generate(encode_prompts([r.messages for r in rows], tokenizer), params)
        texts = [o.text for outs in outputs for o in outs]
        answers = [r.answer for r, outs in zip(rows, outputs) for _ in outs]
        rewards, stats = score_responses(texts, answers, num_workers=reward_workers)
        per_problem = [sum(rewards[i * samples:(i + 1) * samples]) / samples for i in range(len(rows))]
        result.scores[name] = round(100.0 * sum(per_problem) / max(len(per_problem), 1), 2)
        result.counts[name] = len(rows)
        result.details[name] = per_problem
        result.unparsed += stats.num_unparsed
    return result


def load_for_eval(path: str | Path, *, model_config: str | None = None, tokenizer: str | None = None,
                  device: torch.device | str = "cpu"):
    """An HF model + tokenizer from an HF directory, or from an engine checkpoint directory."""
    from transformers import AutoModelForCausalLM

    from engine.models import PackedCausalLM, build_model

    path = Path(path)
    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        return model.to(device).eval(), load_tokenizer(tokenizer or path)
    if not (path / ".metadata").is_file():
        raise CeilingError(f"{path}: neither an HF model directory (config.json) nor a checkpoint (.metadata)")
    if model_config is None or tokenizer is None:  # runs/<name>/checkpoints/step_N -> runs/<name>/config.yaml
        run_cfg = path.parent.parent / "config.yaml"
        if not run_cfg.is_file():
            raise CeilingError(f"{path}: pass --model-config and --tokenizer (no run config at {run_cfg})")
        model_section = yaml.safe_load(run_cfg.read_text())["model"]
        if model_section.get("path") and model_config is None:
            model_config = model_section["path"]
        model_config = model_config or model_section["config"]
        tokenizer = tokenizer or model_section.get("tokenizer") or model_section.get("path")
    import torch.distributed.checkpoint as dcp

    cfg_path = Path(model_config)
    hf = build_model(config=cfg_path if cfg_path.is_file() else cfg_path / "config.json")
    wrapper = PackedCausalLM(hf)
    state = {"model": wrapper.state_dict()}
    dcp.load(state, checkpoint_id=str(path))  # loads in place into the plain tensors
    hf.config._attn_implementation = "sdpa"
    return hf.to(device).eval(), load_tokenizer(tokenizer)


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="pass@1 of a model or checkpoint on local benchmark files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF model directory or engine checkpoint directory")
    p.add_argument("--benchmarks", nargs="+", required=True, metavar="FILE",
                   help="JSONL/Parquet files of {prompt, answer}; the file stem names the benchmark")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (avg@k); default 1")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-prompts", type=int, default=None, help="first N problems of each file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reward-workers", type=int, default=0)
    p.add_argument("--model-config", default=None, help="HF config.json for a checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="'char' or a tokenizer directory for a checkpoint")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from engine.distributed import detect_device_type

    device = "cuda" if detect_device_type() == "cuda" else "cpu"
    model, tokenizer = load_for_eval(args.model, model_config=args.model_config, tokenizer=args.tokenizer,
                                     device=device)
    names = {}
    for file in args.benchmarks:
        stem = Path(file).stem
        if stem in names:
            raise CeilingError(f"two benchmark files are named {stem!r}: {names[stem]} and {file}")
        names[stem] = file
    result = evaluate_model(model, tokenizer, names, samples=args.samples, temperature=args.temperature,
                            top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                            batch_size=args.batch_size, reward_workers=args.reward_workers,
                            max_prompts=args.max_prompts, device=device)
    width = max(len(n) for n in result.scores)
    for name, score in result.scores.items():
        print(f"{name:<{width}}  {score:6.2f}%  ({result.counts[name]} problems, {args.samples} samples each)")
    print(f"{'overall':<{width}}  {result.overall:6.2f}%  (weighted by problem count; {result.unparsed} unparsed)")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    return 0
