"""SFT step throughput: the engine's real `SFTTrainer.train_step` against the plain-transformers recipes, same data.

    python benchmarks/bench_sft.py                                    # GPU: Qwen2.5-1.5B and 0.5B shapes
    python benchmarks/bench_sft.py --model-config configs/models/qwen2.5-0.5b.json --micro-batch-tokens 8192
    python benchmarks/bench_sft.py --smoke                            # CPU, tiny model: checks the script runs
    python benchmarks/bench_sft.py --dry-run                          # CPU: arguments, configs, imports; no CUDA

Every implementation trains the same randomly initialised model on the same `--sequences` lognormal-length
sequences (mean ~900 tokens) per optimizer step, with the same objective: the sum of next-token losses
over the trajectory tokens divided by their count (HF: `num_items_in_batch`), gradient clipping at 1.0,
AdamW. Rows:
  engine              `SFTTrainer.train_step` as training runs it: token store, FFD packing into micro-batches
                      of `--micro-batch-tokens`, packed attention, fused LM-head loss, FSDP2 (world of one),
                      NaN guard, scheduler; global batch = all the sequences, so each step sees all of them
  engine+compile      the same with per-block torch.compile (kernels.compile)
  engine+liger        the same with Liger RMSNorm/SwiGLU/RoPE (GPU only: Liger's kernels need one)
  hf padded random    `model(input_ids, attention_mask, labels)` over padded batches of `--pad-batch` in the
                      seeded order (SDPA, full logits), bf16 autocast over fp32 weights
  hf padded grouped   the same with length-grouped batches (sorted by length, then batched)
  hf padding-free     sequences concatenated into rows of <= `--micro-batch-tokens` with restarting position_ids
                      and no attention mask (transformers derives the per-sequence mask; what TRL's
                      `padding_free` runs), plus Liger's kernels and fused linear cross-entropy on GPU
tokens/s counts real tokens (no padding). MFU counts 6 x matmul params per token + causal attention from
the real lengths (engine/flops.py `mfu_step_flops`). The first-step loss of every row is printed: they are
the same objective on the same weights, so they must agree. Rows run in the order of IMPLS (the baseline
first, since every row's speedup is against it; the inductor compile last) and each is printed and appended to
benchmarks/RESULTS.md (or --results) as soon as it is measured, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import RESULTS, ResultsStream, environment  # noqa: E402

from engine import flops as flops_lib  # noqa: E402
from engine.config import DataConfig, KernelConfig, ModelConfig, RunConfig, SFTConfig, SFTJobConfig  # noqa: E402
from engine.data.token_store import TokenStore, write_token_store  # noqa: E402
from engine.distributed import destroy_distributed  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.sft.trainer import SFTTrainer  # noqa: E402

PROMPT_TOKENS = 64  # no loss on the first tokens of each sequence, as on a chat prompt
IMPLS = ["hf padded random", "engine", "engine+liger", "hf padding-free", "hf padded grouped", "engine+compile"]
COLUMNS = [("model", "model", ""), ("impl", "impl", ""), ("micro_batches", "micro-batches", "d"),
           ("step_s", "step (s)", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"), ("speedup", "x hf padded random", ".2f"),
           ("mfu", "MFU (%)", ".1f"), ("peak_gib", "peak (GiB)", ".1f"), ("first_loss", "first-step loss", ".6f")]


def make_sequences(n: int, mean: float, cap: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sigma = 0.8
    lengths = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n).clip(PROMPT_TOKENS + 8, cap).astype(int)
    return [rng.integers(0, vocab, size=int(n_tok)).tolist() for n_tok in lengths]


def loss_mask(seq) -> list[int]:
    return [0] * PROMPT_TOKENS + [1] * (len(seq) - PROMPT_TOKENS)


def engine_step_fn(model_config: str, store: TokenStore, args, device_type: str, work: Path, kernels: KernelConfig):
    job = SFTJobConfig(
        run=RunConfig(name=f"bench-{os.getpid()}", output_dir=str(work), device=device_type, progress=False),
        model=ModelConfig(config=model_config, tokenizer="char"),
        data=DataConfig(train_path="unused.jsonl"),
        sft=SFTConfig(steps=10_000, global_batch_size=len(store), micro_batch_tokens=args.micro_batch_tokens,
                      lr=1e-5, grad_clip=1.0, val_every=0, checkpoint_every=0, export_hf=False),
        kernels=kernels)
    with socket.socket() as sock:  # a fresh rendezvous port per trainer: the last one may still be in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    trainer = SFTTrainer(job, stores=(store, None))

    def step():
        out = trainer.train_step()
        return out["train/loss"], out["train/micro_batches"]

    return step


def hf_step_fn(model_config: str, seqs, args, device, dtype, layout: str):
    hf = build_model(config=model_config, dtype=torch.float32, seed=0)
    hf.config._attn_implementation = "sdpa"
    if layout == "padding-free" and device.type == "cuda":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=hf, rope=True, rms_norm=True, swiglu=True,
                                        fused_linear_cross_entropy=True, cross_entropy=False)
    hf.to(device).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, foreach=True)
    n_loss = sum(sum(loss_mask(s)[1:]) for s in seqs)
    batches = []
    if layout == "padding-free":
        rows, row = [], []
        for s in sorted(seqs, key=len, reverse=True):  # first-fit-decreasing rows, as TRL's packing
            placed = next((r for r in rows if sum(map(len, r)) + len(s) <= args.micro_batch_tokens), None)
            (placed if placed is not None else (rows.append(row := []) or row)).append(s)
        for r in rows:
            ids = torch.tensor([t for s in r for t in s])[None]
            pos = torch.cat([torch.arange(len(s)) for s in r])[None]
            labels = torch.tensor([t if m else -100 for s in r for t, m in zip(s, loss_mask(s))])
            starts = np.cumsum([0] + [len(s) for s in r[:-1]])
            labels[starts] = -100  # HF shifts labels: a sequence's first token is never the target of the previous
            batches.append(dict(input_ids=ids.to(device), position_ids=pos.to(device), labels=labels[None].to(device)))
    else:
        order = sorted(seqs, key=len) if layout == "grouped" else seqs
        for i in range(0, len(order), args.pad_batch):
            group = order[i:i + args.pad_batch]
            width = max(len(s) for s in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            labels = torch.full((len(group), width), -100, dtype=torch.long)
            for r, s in enumerate(group):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
                labels[r, :len(s)] = torch.tensor([t if m else -100 for t, m in zip(s, loss_mask(s))])
            batches.append(dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)))

    def step():
        total = torch.zeros((), device=device)
        for b in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = hf(**b, num_items_in_batch=n_loss).loss
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, len(batches)

    return step


def timed(step, device, warmup: int, steps: int):
    first_loss, n_micro = step()
    first_loss = float(first_loss)
    for _ in range(warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak, first_loss, n_micro


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", nargs="+", default=[str(ROOT / "configs/models/qwen2.5-1.5b.json"),
                                                          str(ROOT / "configs/models/qwen2.5-0.5b.json")])
    ap.add_argument("--sequences", type=int, default=64, help="sequences per optimizer step")
    ap.add_argument("--mean-len", type=float, default=900)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--pad-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--impl", nargs="+", choices=IMPLS, default=None,
                    help="subset of rows to run (default: all that apply), always in IMPLS order")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, 1 step: checks the script runs")
    ap.add_argument("--dry-run", action="store_true", help="check arguments, model configs and imports; no CUDA")
    ap.add_argument("--results", default=str(RESULTS), help="markdown file to append to")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model_config = [str(ROOT / "configs/models/tiny-qwen2.json")]
        args.sequences, args.mean_len, args.max_len, args.micro_batch_tokens = 8, 100, 160, 512
        args.steps, args.warmup, args.no_record = 1, 1, True
    dims = {config: flops_lib.model_dims(config) for config in args.model_config}  # a bad config fails here
    os.environ.setdefault("TRITON_INTERPRET", "0")
    if args.dry_run:
        if "engine+liger" in (args.impl or IMPLS) or "hf padding-free" in (args.impl or IMPLS):
            import liger_kernel.transformers  # noqa: F401  (the GPU rows' kernels)
        for config, d in dims.items():
            print(f"{Path(config).stem}: vocab {d.vocab}; rows {', '.join(args.impl or IMPLS)}")
        print("bench_sft --dry-run: arguments, model configs and imports checked; no CUDA call made")
        return []
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_type)
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    peak = flops_lib.peak_flops(torch.device(device_type, 0) if device_type == "cuda" else device)
    impls = list(IMPLS)
    if device_type != "cuda":
        impls.remove("engine+liger")  # Liger's RMSNorm/SwiGLU kernels need a GPU (see tests/test_patches.py)
    if args.smoke:
        impls.remove("engine+compile")  # minutes of inductor compile on CPU; tests/test_patches.py covers it
    impls = [i for i in impls if args.impl is None or i in args.impl]
    title = (f"SFT train step: {args.sequences} sequences/step, lognormal mean {args.mean_len:.0f} tokens (max "
             f"{args.max_len}), budget {args.micro_batch_tokens} tokens/micro-batch, padded batches of {args.pad_batch}")
    stream = ResultsStream(title, environment(device), COLUMNS, path=None if args.no_record else args.results,
                           notes="MFU: 6 x matmul params per token + causal attention from real lengths "
                                 "(engine/flops.py). Rows appended as measured.")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for config in args.model_config:
            seqs = make_sequences(args.sequences, args.mean_len, args.max_len, dims[config].vocab, seed=0)
            store = TokenStore(write_token_store(work / f"store-{Path(config).stem}", ((s, loss_mask(s)) for s in seqs)))
            tokens = sum(len(s) for s in seqs)
            flops = flops_lib.mfu_step_flops(config, [len(s) for s in seqs])
            base = None
            for impl in impls:
                if impl.startswith("engine"):
                    kernels = KernelConfig(compile=impl == "engine+compile", liger_rms_norm=impl == "engine+liger",
                                           liger_swiglu=impl == "engine+liger", liger_rope=impl == "engine+liger")
                    step = engine_step_fn(config, store, args, device_type, work, kernels)
                else:
                    step = hf_step_fn(config, seqs, args, device, dtype, impl.split()[-1])
                seconds, mem, first_loss, n_micro = timed(step, device, args.warmup, args.steps)
                if impl == "hf padded random":
                    base = tokens / seconds
                stream.row({"model": Path(config).stem, "impl": impl, "micro_batches": n_micro, "step_s": seconds,
                            "tokens_per_s": tokens / seconds, "speedup": tokens / seconds / base if base else None,
                            "mfu": 100 * flops / seconds / peak if peak else None, "peak_gib": mem,
                            "first_loss": first_loss})
                del step
                destroy_distributed()
                if device_type == "cuda":
                    torch.cuda.empty_cache()
    return stream.rows


if __name__ == "__main__":
    main()
