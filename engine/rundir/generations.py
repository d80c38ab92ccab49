"""What the model generated: one JSON line per sample, the text behind every reward and every score.

    <run>/generations/step_00000010.jsonl        RL step 10's rollouts (every `rl.dump_generations`-th step)
    <run>/generations/eval_step_00000010.jsonl   the evaluation after step 10 (every evaluation, when dumping)
    ceiling eval MODEL --benchmarks F --dump out.jsonl

A file holds at most `max_rows` rows (`rl.dump_max_rows`; the first ones, in prompt order), and says how many
it left out in its last line (`{"truncated_rows": N}`), so a dump never grows with the batch beyond its cap. Each
file is written whole (a temp file renamed into place), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class GenerationRecord:
    """One generated sample and how it was scored."""

    kind: str
    """"rollout" (an RL step's training sample) or "eval"."""
    step: int
    """The RL step the weights had finished (0: before the first update), or the checkpoint's step for an eval."""
    prompt_id: str
    sample: int
    """Its index among the prompt's samples."""
    prompt: str
    response: str
    answer: Any
    reward: float
    correct: bool
    outcome: str
    """correct | wrong | unparsed | error | timeout (engine/reward.py)."""
    reason: str
    """Why scoring failed (errors and timeouts), else empty."""
    finish_reason: str
    """stop (the turn ended) or length (cut at max_new_tokens)."""
    response_tokens: int
    weight_version: int | None
    data_source: str | None = None
    round: int | None = None
    """The dynamic-sampling round that generated it (rollouts)."""
    kept: bool | None = None
    """Whether its group was kept for the update (rollouts: DAPO drops groups with equal rewards)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_generations(path: str | Path, records: Sequence[GenerationRecord], max_rows: int) -> Path:
    """Write at most `max_rows` of `records` to `path` as JSON Lines, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records[:max_rows]:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        if len(records) > max_rows:
            f.write(json.dumps({"truncated_rows": len(records) - max_rows}) + "\n")
    os.replace(tmp, path)
    return path


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a generations file (the `truncated_rows` line included, if any)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
