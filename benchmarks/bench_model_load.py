"""Meta-device init + sharded HF load (and sharded HF export): per-rank peak host memory on CPU/gloo.

    python benchmarks/bench_model_load.py                       # 1.1B-parameter Qwen2-shaped model, 2 ranks
    python benchmarks/bench_model_load.py --ranks 2 4 --baseline
    python benchmarks/bench_model_load.py --smoke               # tiny model: checks the script runs

A Qwen2-shaped model of `--layers` x hidden 2048 (GQA 16/4 heads, SwiGLU 5632, vocab 32000, untied) is
built once from its config with random bf16 weights and saved as an HF safetensors directory under
`--model-dir` (default /tmp/ceiling-bench-1b; never in the repo). Then, for each rank count, torchrun starts
that many gloo ranks, each running the trainers' `build_policy` (meta init -> fully_shard -> each rank reads
only its rows, as fp32 master weights) and then `save_hf_sharded`; each rank reports VmHWM (peak resident
memory) after import, after the load and after the export. `--baseline` also measures the old path, where
every rank loads the full model with `from_pretrained` before sharding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import append_results, environment, print_table  # noqa: E402


def status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return out


def make_model(model_dir: Path, layers: int, hidden: int, smoke: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (model_dir / "config.json").is_file():
        return
    cfg = AutoConfig.for_model("qwen2", hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                               num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                               vocab_size=1000 if smoke else 32000, max_position_embeddings=4096,
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)


def worker(model_dir: str, export_dir: str, baseline: bool) -> None:
    import torch

    from engine.config import ModelConfig
    from engine.distributed import apply_fsdp, init_distributed
    from engine.models import PackedCausalLM, build_model
    from engine.models.hf_checkpoint import save_hf_sharded
    from engine.training import build_policy

    info = init_distributed("cpu")
    record = {"rank": info.rank, "import": status()}
    if baseline:  # the old path: the full fp32 model on every rank, then shard
        model = PackedCausalLM(build_model(path=model_dir, dtype=torch.float32))
        apply_fsdp(model, model.layers, param_dtype=torch.float32, device=info.device)
    else:
        model, _ = build_policy(ModelConfig(path=model_dir, tokenizer=model_dir), 0, info)
    record["load"] = status()
    record["params"] = sum(p.numel() for p in model.parameters())
    record["local_bytes"] = sum(p.to_local().numel() * 4 for p in model.parameters())
    if not baseline:
        save_hf_sharded(model, export_dir, dtype=torch.bfloat16, max_shard_bytes=1 << 30)
        record["export"] = status()
    Path(f"{export_dir}.mem{info.rank}.json").write_text(json.dumps(record))  # stdout lines of ranks interleave


def run(model_dir: Path, ranks: int, baseline: bool) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(29700 + os.getpid() % 1000), __file__, "--worker", str(model_dir), str(model_dir) + "-export"]
    if baseline:
        cmd.append("--baseline")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{ranks}-rank load failed:\n{out.stderr[-4000:]}")
    files = [Path(f"{model_dir}-export.mem{r}.json") for r in range(ranks)]
    records = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/ceiling-bench-1b")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument("--baseline", action="store_true", help="also measure full-model-per-rank loading")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        return worker(*args.worker, baseline="--baseline" in sys.argv)
    if args.smoke:
        args.model_dir, args.layers, args.hidden, args.no_record = args.model_dir + "-smoke", 2, 256, True
    model_dir = Path(args.model_dir)
    make_model(model_dir, args.layers, args.hidden, args.smoke)
    file_gb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30
    rows = []
    for ranks in args.ranks:
        for baseline in ([False, True] if args.baseline else [False]):
            for r in sorted(run(model_dir, ranks, baseline), key=lambda r: r["rank"]):
                fp32_gib = r["params"] * 4 / 2**30
                rows.append({"path": "full load per rank" if baseline else "meta + sharded load", "ranks": ranks,
                             "rank": r["rank"], "params_b": r["params"] / 1e9, "fp32_gib": fp32_gib,
                             "file_gib": file_gb, "shard_gib": r["local_bytes"] / 2**30,
                             "import_hwm": r["import"]["VmHWM"], "load_hwm": r["load"]["VmHWM"],
                             "load_anon": r["load"]["RssAnon"], "export_hwm": r.get("export", {}).get("VmHWM"),
                             "ratio": (r["load"]["VmHWM"] - r["import"]["VmHWM"]) / fp32_gib})
    columns = [("path", "path", ""), ("ranks", "ranks", "d"), ("rank", "rank", "d"), ("params_b", "params (B)", ".2f"),
               ("fp32_gib", "full fp32 GiB", ".2f"), ("file_gib", "bf16 files GiB", ".2f"),
               ("shard_gib", "own shard GiB", ".2f"), ("import_hwm", "peak after import GiB", ".2f"),
               ("load_hwm", "peak after load GiB", ".2f"), ("load_anon", "anon after load GiB", ".2f"),
               ("export_hwm", "peak after export GiB", ".2f"), ("ratio", "load's peak increase / full fp32", ".2f")]
    title = (f"Meta init + sharded HF load on CPU/gloo: Qwen2-shaped {args.layers} layers x {args.hidden} "
             f"(bf16 safetensors -> fp32 FSDP2 shards), then sharded bf16 export (1 GiB files)")
    print_table(title, rows, columns)
    if not args.no_record:
        import torch

        append_results(title, environment(torch.device("cpu")), rows, columns)


if __name__ == "__main__":
    main()
