"""What an RL run samples and evaluates, as records: the prompts with their rows, one step's generation rounds
(samples, reward counts, timings, token counts, their metrics and dump rows), one held-out evaluation, and where
the prompts come from (rl.prompts_path / rl.eval_path, or the synthetic task's splits).

    step = RolloutStep(dump=True); step.add_round(prompts, samples, stats, timing); step.metrics()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.config import RLJobConfig
from engine.data.layouts import PromptRow
from engine.data.synthetic import write_task
from engine.distributed import barrier
from engine.errors import CeilingError
from engine.evaluate import ScoredSample, generation_records, length_metrics
from engine.reward import RewardStats
from engine.rundir.generations import GenerationRecord


@dataclass
class Prompt:
    row: PromptRow  # id, messages, reference answer, data source, extra info (engine/data/layouts.py)
    ids: list[int]
    expert_ids: list[int] | None  # expert trajectory + end-of-turn token
    expert_reward: float | None = None  # the expert trajectory scored by the reward (on first use)


@dataclass
class EvalOutcome:
    """One held-out evaluation: `summarize_samples` (pass@1 and the rest, fractions), the same per data source,
    and the samples' dump rows (when the run dumps generations)."""

    metrics: dict[str, float]
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    records: list[GenerationRecord] = field(default_factory=list)


@dataclass
class RolloutStep:
    """What one step's generation rounds produced: the samples of every round, the reward's counts, generation and
    scoring seconds, and token counts (Appendix C's generation pass: prompt + response of every sample)."""

    dump: bool
    """Keep the texts: the step writes its generations."""
    rounds: list[tuple[list[Prompt], list[list[ScoredSample]]]] = field(default_factory=list)
    stats: RewardStats = field(default_factory=RewardStats)
    rollout_s: float = 0.0
    reward_s: float = 0.0
    gen_tokens: int = 0
    new_tokens: int = 0

    def add_round(self, prompts: list[Prompt], samples: list[list[ScoredSample]], stats: RewardStats,
                  timing: dict[str, float]) -> None:
        self.rounds.append((prompts, samples))
        self.stats = self.stats + stats
        self.rollout_s += timing["rollout"]
        self.reward_s += timing["reward"]
        self.gen_tokens += sum(len(p.ids) + s.n_tokens for p, group in zip(prompts, samples) for s in group)
        self.new_tokens += sum(s.n_tokens for group in samples for s in group)

    def metrics(self) -> dict[str, float]:
        """Reward, truncation and lengths over every sample generated (all rounds), per data source where rows name
        one."""
        flat = [(p, s) for prompts, samples in self.rounds for p, group in zip(prompts, samples) for s in group]
        out = {"rollout/reward_mean": sum(s.score.reward for _, s in flat) / max(len(flat), 1),
               "rollout/unparsed": self.stats.num_unparsed, "rollout/reward_failed": self.stats.num_failed,
               **{f"rollout/{k}": v for k, v in length_metrics([s.n_tokens for _, s in flat],
                                                               [s.finish_reason for _, s in flat]).items()}}
        sources: dict[str, list[float]] = {}
        for p, s in flat:
            if p.row.data_source is not None:
                sources.setdefault(p.row.data_source, []).append(s.score.reward)
        out.update({f"rollout/{src}/reward_mean": sum(r) / len(r) for src, r in sorted(sources.items())})
        return out

    def records(self, step: int, kept: set[int], weight_version: int, tokenizer) -> list[GenerationRecord]:
        """Every sample of every round, as dump rows (`kept`: ids of the groups dynamic sampling kept)."""
        out = []
        for k, (prompts, samples) in enumerate(self.rounds):
            out += generation_records("rollout", step, [p.row for p in prompts], [tokenizer.decode(p.ids) for p in prompts],
                                      samples, weight_version, round=[k] * len(prompts),
                                      kept=[id(group) in kept for group in samples])
        return out


def rl_prompt_files(job: RLJobConfig, run_dir: Path, is_main: bool) -> tuple[object, object]:
    """(prompts, eval) path settings of an RL job: rl.prompts_path / rl.eval_path, or the synthetic task's rl and eval
    splits, written to `<run_dir>/data/` first (by the main rank)."""
    prompts_path, eval_path = job.rl.prompts_path, job.rl.eval_path
    if job.data.synthetic is not None:
        out = run_dir / "data"
        if is_main and not (out / "task_config.json").is_file():
            write_task(job.data.synthetic, out)
        barrier()
        prompts_path = prompts_path or str(out / "rl.jsonl")
        eval_path = eval_path or str(out / "eval.jsonl")
    if prompts_path is None:
        raise CeilingError("rl.prompts_path is required unless data.synthetic is set")
    return prompts_path, eval_path
