"""The synthetic task written in the layouts practitioners' files have, so every path a user's own data takes
(recognition, Parquet, chat prompts, verl's `reward_model`, LUFFY's `target`, MATH-500's fields, data sources)
runs here without a download.

    ceiling data runs/openr1-tiny                          # the demo's task (configs/tiny.yaml's data.synthetic)
    ceiling data runs/openr1-tiny --config configs/sweep-tiny.yaml --set data.synthetic.num_train=1000

writes into the folder:
    openr1.parquet         the SFT split in LUFFY's and UPT's openr1 layout (verl's RL layout plus `target`):
                           data_source, prompt (chat messages), target ([the expert's assistant message]),
                           ability, reward_model {style, ground_truth}, extra_info {index, split}
    openr1-small.parquet   its first fifth, same layout (a second data scale for a sweep's scenes)
    openr1-valid.parquet   the validation split, same layout
    openr1-rl.parquet      the RL prompts, same layout (LUFFY/SRFT/UPT take their experts from `target`)
    math500.jsonl          the eval split in MATH-500's layout: problem, solution, answer, subject, level, unique_id
`data_source` names the problem's number of operations (`synthetic-2op`, `synthetic-3op`), so the metrics that
split by data source have something to split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.data.synthetic import SyntheticTaskConfig, generate_task, write_jsonl

FILES = {"train": "openr1.parquet", "small": "openr1-small.parquet", "val": "openr1-valid.parquet",
         "rl": "openr1-rl.parquet", "eval": "math500.jsonl"}


def openr1_row(row: dict, split: str, index: int) -> dict:
    """One synthetic row in the openr1 layout (verl's RL layout with LUFFY's `target`)."""
    out = {"data_source": f"synthetic-{row['num_ops']}op",
           "prompt": [{"role": "user", "content": row["prompt"]}],
           "ability": "math",
           "reward_model": {"style": "rule", "ground_truth": row["answer"]},
           "extra_info": {"index": index, "split": split}}
    if "response" in row:
        out["target"] = [{"role": "assistant", "content": row["response"]}]
    return out


def math500_row(row: dict, index: int) -> dict:
    """One synthetic eval row in MATH-500's layout."""
    return {"problem": row["prompt"], "solution": "", "answer": row["answer"], "subject": "Arithmetic",
            "level": row["num_ops"], "unique_id": f"synthetic/eval/{index}.json"}


def write_public_layouts(cfg: SyntheticTaskConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write the task's splits as FILES under `out_dir`; returns split -> path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = generate_task(cfg)
    task["small"] = task["train"][:max(1, len(task["train"]) // 5)]
    paths = {}
    for split in ("train", "small", "val", "rl"):
        rows = [openr1_row(r, "train" if split == "small" else split, i) for i, r in enumerate(task[split])]
        paths[split] = out_dir / FILES[split]
        pq.write_table(pa.Table.from_pylist(rows), paths[split])
    paths["eval"] = write_jsonl((math500_row(r, i) for i, r in enumerate(task["eval"])), out_dir / FILES["eval"])
    return paths


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="write the synthetic task as files in openr1's and MATH-500's layouts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write the files into")
    p.add_argument("--config", default="configs/tiny.yaml", help="a run config whose data.synthetic is the task")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.synthetic.num_train=1000 (repeatable)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import yaml

    from engine.config import from_dict
    from engine.errors import ConfigError

    task = ((yaml.safe_load(Path(args.config).read_text()) or {}).get("data") or {}).get("synthetic")
    if task is None:
        raise ConfigError(f"{args.config}: data.synthetic is not set: nothing to write")
    for override in args.overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.startswith("data.synthetic."):
            raise ConfigError(f"--set {override!r}: expected data.synthetic.KEY=VALUE")
        task[key.removeprefix("data.synthetic.")] = yaml.safe_load(value)
    cfg = from_dict(SyntheticTaskConfig, task, f"{args.config}: data.synthetic")
    for split, path in write_public_layouts(cfg, args.out).items():
        print(f"{split:>5}: {path}")
    return 0
