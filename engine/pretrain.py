"""`ceiling pretrain CONFIG`: a tiny base model that already solves part of the synthetic task.

Why: the paper's base model (Qwen2.5-7B) solves part of its task before any SFT or RL, and that is what makes
pure RL and the synchronized SFT-RL methods (LUFFY, SRFT, UPT) meaningful baselines. A random init samples no
correct answer, so RL from it never gets a reward. This stage trains the tiny model on text that is *not* the
expert trajectories:

    arithmetic facts      "17+8=?"  ->  "17+8=25."             every fact a+b, a-b with a <= fact_max_value
    direct answers        "Tom has 3 pens, buys 5 more, ..."  ->  "\\boxed{6}"   no intermediate steps

The direct-answer problems are drawn at the task's difficulty levels, never from its eval, RL or validation
problems (engine/data/synthetic.task_problems). A model that must answer in one go, with no steps, solves a
fraction of the multi-step problems (`configs/pretrain-tiny.yaml`: roughly 5-20% pass@1 at T=0.7), and it
knows the answer format; SFT on the step-by-step trajectories then teaches it to reason in steps.

    ceiling pretrain configs/pretrain-tiny.yaml     # ~3 min on 2 CPU cores; writes runs/pretrain-tiny/hf/
                                                    # and copies it to pretrain.export_dir

The run is an SFT run of engine/sft on the corpus (so it resumes, checkpoints and logs like one), seeded by
`run.seed` and `corpus.seed`: the same command on the same machine and versions gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from engine.config import (
    DataConfig,
    PretrainCorpusConfig,
    PretrainJobConfig,
    SFTJobConfig,
    add_config_arguments,
)
from engine.data.synthetic import (
    level_weights,
    levels,
    render,
    sample_problem,
    task_problems,
    write_jsonl,
)
from engine.rundir.files import read_json, write_json_atomic
from engine.sft.trainer import SFTTrainer

log = logging.getLogger("ceiling")


def facts(max_value: int) -> list[tuple[str, str]]:
    """Every a+b and a-b (b in 1..9, a in 0..max_value, no negative result) as (prompt, response)."""
    rows = []
    for a in range(max_value + 1):
        for b in range(1, 10):
            rows.append((f"{a}+{b}=?", f"{a}+{b}={a + b}."))
            if b <= a:
                rows.append((f"{a}-{b}=?", f"{a}-{b}={a - b}."))
    return rows


def build_corpus(cfg: PretrainCorpusConfig) -> dict[str, list[dict]]:
    """'train' (facts and direct answers, shuffled) and 'val' (direct answers) rows {id, prompt, response}."""
    avoid = task_problems(cfg.task, ("eval", "rl", "val"))
    rng = random.Random(cfg.seed)
    lv, weights = levels(cfg.task), level_weights(cfg.task, "uniform")
    direct: list[tuple[str, str]] = []
    seen = set(avoid)
    need, misses = cfg.num_direct + cfg.num_val, 0
    while len(direct) < need:
        num_ops, num_digits = rng.choices(lv, weights)[0]
        problem = sample_problem(rng, cfg.task, num_ops, num_digits)
        if problem in seen:
            misses += 1
            if misses > 1000 + 100 * need:
                raise ValueError(f"corpus: only {len(direct)} distinct direct-answer problems outside the task's "
                                 f"eval/rl/val splits; lower corpus.num_direct or widen corpus.task")
            continue
        seen.add(problem)
        prompt, _, answer = render(problem, rng)
        direct.append((prompt, f"\\boxed{{{answer}}}"))
    train = direct[cfg.num_val:] + (facts(cfg.fact_max_value) * cfg.fact_repeats if cfg.fact_max_value else [])
    rng.shuffle(train)
    return {
        "train": [{"id": f"pretrain-{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(train)],
        "val": [{"id": f"pretrain-val-{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(direct[:cfg.num_val])],
    }


def run_pretrain(job: PretrainJobConfig) -> dict:
    """Write the corpus to `<run>/data/`, train on it (an SFT run in `<run>/`), export `<run>/hf/`."""
    from engine.distributed import destroy_distributed

    run_dir = Path(job.run.output_dir) / job.run.name
    data_dir = run_dir / "data"
    if not (data_dir / "corpus_config.json").is_file():
        corpus = build_corpus(job.corpus)
        for split, rows in corpus.items():
            write_jsonl(rows, data_dir / f"{split}.jsonl")
        write_json_atomic(data_dir / "corpus_config.json", asdict(job.corpus))  # last: it marks the corpus whole
        log.info("pretrain: corpus of %d rows (%d held out) in %s", len(corpus["train"]), len(corpus["val"]), data_dir)
    elif read_json(data_dir / "corpus_config.json") != json.loads(json.dumps(asdict(job.corpus))):
        raise ValueError(f"{data_dir / 'corpus_config.json'}: this run was started with another corpus; "
                         f"choose another run.name or remove {run_dir}")
    sft_job = SFTJobConfig(run=job.run, model=job.model,
                           data=DataConfig(train_path=str(data_dir / "train.jsonl"), val_path=str(data_dir / "val.jsonl"),
                                           max_seq_len=job.max_seq_len),
                           sft=replace(job.sft, export_hf=True), kernels=job.kernels, fsdp=job.fsdp)
    summary = SFTTrainer(sft_job).fit()
    destroy_distributed()
    if job.export_dir:
        export = Path(job.export_dir)
        tmp = export.with_name(export.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(summary["hf_dir"], tmp)
        shutil.rmtree(export, ignore_errors=True)
        tmp.rename(export)
        summary["export_dir"] = str(export)
        log.info("pretrain: base model copied to %s", export)
    return summary


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="a tiny base model from arithmetic facts and direct answers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from engine.jobs import run_job

    return run_job(args, PretrainJobConfig, run_pretrain)
