"""Benchmark: fused LM head + loss (forward + backward) against its floor and the anchors, same run.

For each shape (Qwen2.5-7B H=3584 V=152064 and Llama-3.2-3B H=3072 V=128256; N = 4096 and 16384 tokens,
5% ignored, bf16) it times forward+backward of
  - ceiling-engine `linear_cross_entropy` and `linear_policy_loss` (GRPO, clipped ratio),
  - the floor: cuBLAS time of the same three GEMMs (logits, grad hidden, grad weight),
  - anchors: eager PyTorch (materialised logits), torch.compile of it, Liger-Kernel's fused linear
    cross-entropy / fused linear GRPO loss, Cut Cross-Entropy; a row says "not installed" when absent,
and reports median time, achieved TFLOP/s (6 N H V), % of the three-GEMM floor, and peak memory above
the inputs and their gradients. Results are printed and appended to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_losses.py            # GPU, full shapes
    .venv/bin/python benchmarks/bench_losses.py --smoke    # CPU, tiny shapes, Triton interpreter + eager
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import RESULTS, append_results, environment, measure, print_table  # noqa: E402

SHAPES = [  # (model, N tokens, H, V)
    ("Qwen2.5-7B", 4096, 3584, 152064),
    ("Qwen2.5-7B", 16384, 3584, 152064),
    ("Llama-3.2-3B", 4096, 3072, 128256),
    ("Llama-3.2-3B", 16384, 3072, 128256),
]
SMOKE_SHAPES = [("smoke", 64, 48, 517)]
IGNORED = 0.05
COLUMNS = [("model", "model", ""), ("N", "N", "d"), ("H", "H", "d"), ("V", "V", "d"), ("loss", "loss", ""),
           ("impl", "implementation", ""), ("time_ms", "time ms", ".2f"), ("tflops", "TFLOP/s", ".1f"),
           ("floor_pct", "% of 3-GEMM", ".0f"), ("peak_gib", "peak GiB", ".3f"), ("note", "note", "")]


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < IGNORED] = -100
    adv = torch.randn(n, generator=g)
    return hidden, weight, labels.to(device), adv.to(device)


# ------------------------------------------------------------------------------------------ implementations


def eager_ce(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)


def eager_grpo(hidden, weight, labels, adv):
    mask = labels != -100
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, torch.where(mask, labels, 0)[:, None])[:, 0]
    ratio = torch.exp(logp - logp.detach())
    pg = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    return (pg * mask).sum() / mask.sum().clamp(min=1)


def ours_ce(backend):
    from engine.losses import linear_cross_entropy

    return lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels, backend=backend)


def ours_grpo(backend):
    from engine.losses import linear_policy_loss

    def fn(hidden, weight, labels, adv):
        mask = labels != -100
        return linear_policy_loss(hidden, weight, labels, advantages=adv, loss_mask=mask, backend=backend).loss
    return fn


def liger_ce():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda hidden, weight, labels: loss_fn(weight, hidden, labels)


def liger_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)

    def fn(hidden, weight, labels, adv):  # one sequence per 512 tokens (Liger's API is [B, L, H])
        n = hidden.shape[0]
        seq = 512 if n % 512 == 0 else n
        mask = (labels != -100).view(-1, seq)
        out = loss_fn(hidden.view(-1, seq, hidden.shape[1]), weight, torch.where(labels < 0, 0, labels).view(-1, seq),
                      mask.long(), adv.view(-1, seq)[:, 0].contiguous())
        return out[0] if isinstance(out, tuple) else out
    return fn


def cce_ce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels, ignore_index=-100)


def cublas_floor(hidden, weight):
    """The three GEMMs of linear + loss forward/backward, in the input dtype, with no loss in between."""
    def fn():
        z = hidden.detach() @ weight.detach().T
        z @ weight.detach()
        z.T @ hidden.detach()
    return fn


# ------------------------------------------------------------------------------------------------- driver


def implementations(loss, smoke, device):
    """(name, factory) pairs; a factory raising ImportError marks the row "not installed"."""
    if loss == "cross_entropy":
        impls = [("ceiling-engine (triton)", lambda: ours_ce("triton")), ("eager PyTorch", lambda: eager_ce)]
        if smoke:
            impls.insert(1, ("ceiling-engine (torch chunked)", lambda: ours_ce("torch")))
        impls += [("torch.compile(eager)", lambda: torch.compile(eager_ce)), ("Liger-Kernel", liger_ce),
                  ("Cut Cross-Entropy", cce_ce)]
    else:
        impls = [("ceiling-engine (triton)", lambda: ours_grpo("triton")), ("eager PyTorch", lambda: eager_grpo)]
        if smoke:
            impls.insert(1, ("ceiling-engine (torch chunked)", lambda: ours_grpo("torch")))
        impls += [("torch.compile(eager)", lambda: torch.compile(eager_grpo)), ("Liger-Kernel", liger_grpo)]
    return impls


def run_one(fn, args, hidden, weight, device, warmup, iters):
    def step():
        hidden.grad = None
        weight.grad = None
        fn(*args).backward()
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    return measure(step, device, warmup=warmup, iters=iters, exclude_bytes=grad_bytes)


def bench_shape(model, n, h, v, *, device, dtype, smoke, warmup, iters):
    hidden, weight, labels, adv = make_inputs(n, h, v, dtype, device)
    flops = 6 * n * h * v
    floor = measure(cublas_floor(hidden, weight), device, warmup=warmup, iters=iters)["time_ms"]
    base = dict(model=model, N=n, H=h, V=v)
    rows = [dict(base, loss="-", impl="cuBLAS 3 GEMMs (floor)", time_ms=floor, tflops=flops / floor / 1e9,
                 floor_pct=100.0, note="materialises N x V")]
    for loss in ("cross_entropy", "grpo"):
        args = (hidden, weight, labels) if loss == "cross_entropy" else (hidden, weight, labels, adv)
        for name, factory in implementations(loss, smoke, device):
            row = dict(base, loss=loss, impl=name)
            if smoke and name.startswith(("torch.compile", "Liger", "Cut")):
                rows.append(dict(row, note="skipped in --smoke"))
                continue
            try:
                fn = factory()
            except ImportError:
                rows.append(dict(row, note="not installed"))
                continue
            try:
                r = run_one(fn, args, hidden, weight, device, warmup, iters)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(dict(row, note="out of memory"))
                continue
            except Exception as exc:  # an anchor's API drift must not kill the whole table
                rows.append(dict(row, note=f"error: {type(exc).__name__}: {str(exc)[:80]}"))
                continue
            peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30
            rows.append(dict(row, time_ms=r["time_ms"], tflops=flops / r["time_ms"] / 1e9,
                             floor_pct=100.0 * floor / r["time_ms"], peak_gib=peak, note=""))
    del hidden, weight
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, Triton interpreter + eager")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to append to")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_kernels is imported (lazily)
        device, dtype, shapes, warmup, iters = torch.device("cpu"), torch.float32, SMOKE_SHAPES, 1, args.iters or 2
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (use --smoke on CPU)")
        device, dtype, shapes, warmup, iters = torch.device("cuda"), torch.bfloat16, SHAPES, 3, args.iters or 10
    rows = []
    for model, n, h, v in shapes:
        rows += bench_shape(model, n, h, v, device=device, dtype=dtype, smoke=args.smoke, warmup=warmup, iters=iters)
    title = f"bench_losses{' --smoke' if args.smoke else ''}: fused linear + loss, forward+backward, {dtype}"
    notes = (f"{int(IGNORED * 100)}% ignored tokens; TFLOP/s counts 6 N H V; % of 3-GEMM = cuBLAS time of the "
             "logits / grad-hidden / grad-weight GEMMs over the row's time; peak = memory above inputs and grads.")
    env = environment(device)
    print_table(title, rows, COLUMNS)
    if not args.no_append:
        append_results(title, env, rows, COLUMNS, notes=notes, path=args.results)
    return rows


if __name__ == "__main__":
    main()
