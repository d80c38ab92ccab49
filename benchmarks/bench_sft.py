"""SFT step throughput: the engine's packed step against plain transformers with padding, same sequences.

    python benchmarks/bench_sft.py                                    # GPU: Qwen2.5-1.5B and 0.5B shapes
    python benchmarks/bench_sft.py --model-config configs/models/qwen2.5-0.5b.json --micro-batch-tokens 8192
    python benchmarks/bench_sft.py --smoke                            # CPU, tiny model: checks the script runs

Both sides train a randomly initialised model on the same lognormal-length sequences (mean ~900 tokens,
as in the issue's anchor) for `--steps` optimizer steps after `--warmup`:
  engine       packed micro-batches of at most `--micro-batch-tokens` (FFD), packed attention, the fused
               LM-head loss, FSDP2 (world of one) with bf16 compute and fp32 master weights, AdamW
  transformers padded micro-batches of `--pad-batch` sequences, `model(input_ids, attention_mask,
               labels).loss` (SDPA, full logits), bf16 autocast over fp32 weights, AdamW
tokens/s counts real (non-pad) tokens; MFU uses the paper's Appendix C FLOPs (3 x forward per token) over
the device's peak (engine/flops.py). Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_results, environment, print_table  # noqa: E402

from engine import flops as flops_lib  # noqa: E402
from engine.data.packing import IGNORE_INDEX, collate_packed, pack_for_ranks  # noqa: E402
from engine.distributed import apply_fsdp, init_distributed  # noqa: E402
from engine.losses import linear_cross_entropy  # noqa: E402
from engine.models import PackedCausalLM, build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_sequences(n: int, mean: float, cap: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sigma = 0.8
    lengths = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n).clip(16, cap).astype(int)
    return [rng.integers(0, vocab, size=int(n_tok)).tolist() for n_tok in lengths]


def engine_step_fn(model_config: str, seqs, budget: int, device, dtype):
    hf = build_model(config=model_config, dtype=torch.float32, seed=0)
    model = PackedCausalLM(hf)
    apply_fsdp(model, model.layers, param_dtype=dtype, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    plan = pack_for_ranks([len(s) for s in seqs], budget, 1)[0]
    batches = [collate_packed([seqs[i] for i in mb], [[0] + [1] * (len(seqs[i]) - 1) for i in mb], mb).to(device)
               for mb in plan]
    n_loss = sum(len(s) - 1 for s in seqs)

    def step():
        for k, b in enumerate(batches):
            model.set_requires_gradient_sync(k == len(batches) - 1)
            loss_fn = partial(linear_cross_entropy, labels=b.labels, ignore_index=IGNORE_INDEX, reduction="sum")
            (model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen, loss_fn) / n_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, hf.config, len(batches)


def transformers_step_fn(model_config: str, seqs, pad_batch: int, device, dtype):
    hf = build_model(config=model_config, dtype=torch.float32, seed=0)
    hf.config._attn_implementation = "sdpa"
    hf.to(device).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, foreach=True)
    batches = []
    for i in range(0, len(seqs), pad_batch):
        group = seqs[i:i + pad_batch]
        width = max(len(s) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        batches.append((ids.to(device), mask.to(device), labels.to(device)))
    n_micro = len(batches)

    def step():
        for ids, mask, labels in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss / n_micro
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, n_micro


def timed(step, device, warmup: int, steps: int) -> tuple[float, float | None]:
    for _ in range(warmup):
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
    return seconds, peak


def main() -> None:
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
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, 2 steps: checks the script runs")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.model_config = [str(ROOT / "configs/models/tiny-qwen2.json")]
        args.sequences, args.mean_len, args.max_len, args.micro_batch_tokens = 8, 64, 128, 512
        args.steps, args.warmup, args.no_record = 1, 1, True
    os.environ.setdefault("TRITON_INTERPRET", "0")
    info = init_distributed("auto")
    device = info.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = flops_lib.peak_flops(device)
    rows = []
    for config in args.model_config:
        vocab = flops_lib.model_dims(config).vocab
        seqs = make_sequences(args.sequences, args.mean_len, args.max_len, vocab, seed=0)
        tokens = sum(len(s) for s in seqs)
        name = Path(config).stem
        for impl in ("engine", "transformers"):
            if impl == "engine":
                step, _, n_micro = engine_step_fn(config, seqs, args.micro_batch_tokens, device, dtype)
            else:
                step, n_micro = transformers_step_fn(config, seqs, args.pad_batch, device, dtype)
            seconds, mem = timed(step, device, args.warmup, args.steps)
            flops = flops_lib.sft_step_flops(config, tokens, tokens / len(seqs))
            rows.append({"model": name, "impl": impl, "micro_batches": n_micro, "tokens_per_s": tokens / seconds,
                         "mfu": 100 * flops / seconds / peak if peak else None, "peak_gib": mem,
                         "step_s": seconds})
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    columns = [("model", "model", ""), ("impl", "impl", ""), ("micro_batches", "micro-batches", "d"),
               ("step_s", "step (s)", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU (%)", ".1f"),
               ("peak_gib", "peak (GiB)", ".1f")]
    title = (f"SFT step throughput: {args.sequences} sequences/step, lognormal mean {args.mean_len:.0f} tokens, "
             f"engine budget {args.micro_batch_tokens} tokens, transformers padded batches of {args.pad_batch}")
    print_table(title, rows, columns)
    if not args.no_record:
        append_results(title, environment(device), rows, columns)


if __name__ == "__main__":
    main()
