"""Benchmark: fused LM head + loss (forward, and forward + backward) against its floor and the anchors, same run.

For each head shape (Qwen2.5-7B H=3584 V=152064, Qwen2.5-1.5B H=1536 V=151936; N = 16384 tokens, 5% ignored,
bf16) and each loss (cross-entropy; GRPO with per-sequence advantages, one sequence per 512 tokens) it
  1. computes a float64 reference of the loss and both gradients (the engine's chunked pass in float64
     with its plain-PyTorch elementwise twins: no [N, V] tensor, exact to ~1e-9),
  2. runs every implementation once and checks it against that reference (loss and gradient errors are
     columns of the table, so a fast wrong row cannot hide),
  3. times forward and forward + backward (median), and measures peak memory above the inputs and their
     gradients, after the previous call's gradients are freed.
Implementations: ceiling-engine; the floor (cuBLAS time of the three GEMMs on the trained tokens only);
eager PyTorch (materialised logits); torch.compile of it (compile caches reset per shape); Liger-Kernel's
fused linear CE / GRPO; Cut Cross-Entropy for CE and GRPO, with its default gradient filtering and exact.
A row says "not installed" when the package is absent. Each row is printed and appended to
benchmarks/RESULTS.md (or --results) as soon as it is measured (`harness.ResultsStream`), in the order
floor, ceiling-engine, Liger, CCE, eager, torch.compile: a run cut short keeps the rows that matter most.

    .venv/bin/python benchmarks/bench_losses.py                 # GPU, both head shapes
    .venv/bin/python benchmarks/bench_losses.py --model Qwen2.5-7B --skip "torch.compile(eager)"
    .venv/bin/python benchmarks/bench_losses.py --tokens 4096   # GPU, fewer tokens
    .venv/bin/python benchmarks/bench_losses.py --smoke         # CPU, tiny shapes, Triton interpreter + eager
    .venv/bin/python benchmarks/bench_losses.py --dry-run       # CPU: arguments, imports, anchors; no CUDA
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import RESULTS, ResultsStream, environment, measure  # noqa: E402

SHAPES = [("Qwen2.5-7B", 3584, 152064), ("Qwen2.5-1.5B", 1536, 151936)]  # (model, H, V)
SMOKE_SHAPES = [("smoke", 48, 517)]
SEQ = 512  # tokens per sequence (GRPO advantages are per sequence)
IGNORED = 0.05
COLUMNS = [("model", "model", ""), ("N", "N", "d"), ("H", "H", "d"), ("V", "V", "d"), ("loss", "loss", ""),
           ("impl", "implementation", ""), ("fwd_ms", "fwd ms", ".2f"), ("time_ms", "fwd+bwd ms", ".2f"),
           ("x_floor", "x floor", ".3f"), ("tflops", "TFLOP/s", ".1f"), ("peak_gib", "peak GiB", ".3f"),
           ("loss_err", "loss err", ".1e"), ("gh_err", "grad_h err", ".1e"), ("gw_err", "grad_W err", ".1e"),
           ("note", "note", "")]


def make_inputs(n, h, v, dtype, device, seq=SEQ, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < IGNORED] = -100
    adv_S = torch.randn(max(n // seq, 1), generator=g)
    return hidden, weight, labels.to(device), adv_S.to(device)


def _adv_tokens(adv_S, n):
    return adv_S.repeat_interleave(n // adv_S.numel())


# ------------------------------------------------------------------------------------------ implementations
# Each takes (hidden, weight, labels, adv_S) and returns the scalar loss. GRPO here: one update per batch
# (old = logp.detach(), so r = 1), clip 0.2, token mean over the trained tokens.


def eager_ce(hidden, weight, labels, adv_S=None):
    logits = (hidden @ weight.T).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)


def _grpo_from_logp(logp, labels, adv_S):
    mask = labels != -100
    adv = _adv_tokens(adv_S, labels.numel())
    ratio = torch.exp(logp - logp.detach())
    pg = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    return (pg * mask).sum() / mask.sum().clamp(min=1)


def eager_grpo(hidden, weight, labels, adv_S):
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    return _grpo_from_logp(logp, labels, adv_S)


def ours_ce(backend=None):
    from engine.losses import linear_cross_entropy

    return lambda hidden, weight, labels, adv_S=None: linear_cross_entropy(hidden, weight, labels, backend=backend)


def ours_grpo(backend=None):
    from engine.losses import linear_policy_loss

    def fn(hidden, weight, labels, adv_S):
        return linear_policy_loss(hidden, weight, labels.clamp(min=0), advantages=_adv_tokens(adv_S, labels.numel()),
                                  loss_mask=labels != -100, backend=backend).loss
    return fn


def liger_ce():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda hidden, weight, labels, adv_S=None: loss_fn(weight, hidden, labels)


def liger_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo")  # bnpo: batch token mean

    def fn(hidden, weight, labels, adv_S):  # Liger's API is [B, L, H] with one advantage per sequence
        b = adv_S.numel()
        mask = (labels != -100).view(b, -1)
        out = loss_fn(hidden.view(b, -1, hidden.shape[1]), weight, labels.clamp(min=0).view(b, -1), mask.long(), adv_S)
        return out[0] if isinstance(out, tuple) else out
    return fn


def _cce(impl):
    from cut_cross_entropy import linear_cross_entropy

    return lambda hidden, weight, labels, **kw: linear_cross_entropy(hidden, weight, labels, ignore_index=-100,
                                                                    impl=impl, **kw)


def cce_ce(impl="cce"):
    fn = _cce(impl)
    return lambda hidden, weight, labels, adv_S=None: fn(hidden, weight, labels)


def cce_grpo(impl="cce"):
    fn = _cce(impl)

    def loss(hidden, weight, labels, adv_S):
        logp = -fn(hidden, weight, labels.clamp(min=0), reduction="none").float()
        return _grpo_from_logp(logp, labels, adv_S)
    return loss


def cublas_floor(hidden, weight, labels):
    """The three GEMMs of linear + loss forward/backward on the trained tokens, in the input dtype."""
    h = hidden.detach()[labels != -100].contiguous()
    w = weight.detach()

    def fn():
        z = h @ w.T
        z @ w
        z.T @ h
    return fn


# ------------------------------------------------------------------------------------------------- driver


IMPLS = ["ceiling-engine", "Liger-Kernel", "Cut Cross-Entropy", "Cut Cross-Entropy exact", "eager PyTorch",
         "torch.compile(eager)"]  # the order rows are measured in: the fused loss and its peers first


def implementations(loss, smoke, skip=()):
    """(name, factory) pairs in IMPLS order; a factory raising ImportError marks the row "not installed"."""
    ours, eager, liger, cce = ((ours_ce, eager_ce, liger_ce, cce_ce) if loss == "cross_entropy" else
                               (ours_grpo, eager_grpo, liger_grpo, cce_grpo))
    impls = [("ceiling-engine", lambda: ours(None)), ("Liger-Kernel", liger), ("Cut Cross-Entropy", lambda: cce("cce")),
             ("Cut Cross-Entropy exact", lambda: cce("cce_exact")), ("eager PyTorch", lambda: eager),
             ("torch.compile(eager)", lambda: torch.compile(eager))]
    if smoke:
        impls.insert(1, ("ceiling-engine (torch elementwise)", lambda: ours("torch")))
    return [(name, factory) for name, factory in impls if name not in skip]


def reference_grads(loss, hidden, weight, labels, adv_S):
    """Loss and gradients in float64 by the engine's chunked pass with the torch elementwise twins."""
    fn = ours_ce("torch") if loss == "cross_entropy" else ours_grpo("torch")
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    value = fn(h, w, labels, adv_S.double())
    value.backward()
    return value.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def bench_impl(fn, args, hidden, weight, ref, device, warmup, iters):
    def clear():
        hidden.grad = None
        weight.grad = None

    clear()
    value = fn(*args)
    value.backward()
    errs = dict(loss_err=abs(value.item() - ref[0].item()) / max(abs(ref[0].item()), 1e-30),
                gh_err=_rel(hidden.grad, ref[1]), gw_err=_rel(weight.grad, ref[2]))

    def step():
        clear()
        fn(*args).backward()

    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    full = measure(step, device, warmup=warmup, iters=iters, exclude_bytes=grad_bytes, reset=clear)
    fwd = measure(lambda: fn(*args), device, warmup=min(warmup, 1), iters=iters)
    clear()
    return dict(errs, time_ms=full["time_ms"], fwd_ms=fwd["time_ms"], peak_bytes=full["peak_bytes"])


def bench_shape(model, n, h, v, *, device, dtype, smoke, warmup, iters, emit, seq=SEQ, skip=()):
    """Measure every implementation at one head shape; `emit(row)` gets each row as soon as it is measured."""
    torch._dynamo.reset()  # torch.compile rows compile for this shape, not a cached earlier one
    hidden, weight, labels, adv_S = make_inputs(n, h, v, dtype, device, seq)
    n_trained = int((labels != -100).sum())
    flops = 6 * n_trained * h * v
    floor = measure(cublas_floor(hidden, weight, labels), device, warmup=warmup, iters=iters)["time_ms"]
    base = dict(model=model, N=n, H=h, V=v)
    emit(dict(base, loss="-", impl="cuBLAS 3 GEMMs (floor)", time_ms=floor, x_floor=1.0,
              tflops=flops / floor / 1e9, note=f"{n_trained} trained tokens; materialises N x V"))
    for loss in ("cross_entropy", "grpo"):
        ref = reference_grads(loss, hidden, weight, labels, adv_S)
        args = (hidden, weight, labels, adv_S)
        for name, factory in implementations(loss, smoke, skip):
            row = dict(base, loss=loss, impl=name)
            if smoke and name.startswith(("torch.compile", "Liger", "Cut")):
                emit(dict(row, note="skipped in --smoke"))
                continue
            try:
                fn = factory()
            except ImportError:
                emit(dict(row, note="not installed"))
                continue
            try:
                r = bench_impl(fn, args, hidden, weight, ref, device, warmup, iters)
            except torch.cuda.OutOfMemoryError:
                hidden.grad = weight.grad = None
                torch.cuda.empty_cache()
                emit(dict(row, note="out of memory"))
                continue
            except Exception as exc:  # an anchor's API drift must not kill the whole table
                hidden.grad = weight.grad = None
                emit(dict(row, note=f"error: {type(exc).__name__}: {str(exc)[:80]}"))
                continue
            peak_bytes = r.pop("peak_bytes")
            peak = None if peak_bytes is None else peak_bytes / 2**30
            emit(dict(row, **r, x_floor=r["time_ms"] / floor, tflops=flops / r["time_ms"] / 1e9, peak_gib=peak,
                      note=""))
        del ref
    del hidden, weight
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dry_run(shapes, skip) -> list[str]:
    """Everything before the first CUDA call: the engine's loss and kernel modules import, and each anchor's
    factory runs (its imports), so a missing wheel or a renamed API shows on CPU. Returns one line per row."""
    import ceiling_kernels.linear_loss  # noqa: F401
    import engine.losses  # noqa: F401

    lines = []
    for model, n, h, v in shapes:
        for loss in ("cross_entropy", "grpo"):
            for name, factory in implementations(loss, False, skip):
                try:
                    factory()
                    state = "ready"
                except ImportError as exc:
                    state = f"not installed ({exc.name or exc})"
                lines.append(f"{model} N={n} H={h} V={v} {loss}: {name}: {state}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, Triton interpreter + eager")
    parser.add_argument("--dry-run", action="store_true", help="check arguments, imports and anchors; no CUDA")
    parser.add_argument("--model", nargs="+", choices=[m for m, _, _ in SHAPES], default=[m for m, _, _ in SHAPES],
                        help="head shapes to run, in this order")
    parser.add_argument("--skip", nargs="+", choices=IMPLS, default=[], help="implementations not to run")
    parser.add_argument("--tokens", type=int, default=16384, help="N tokens per call (a multiple of 512)")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to append to")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before ceiling_kernels is imported (lazily)
        device, dtype, warmup, iters = torch.device("cpu"), torch.float32, 0, args.iters or 1
        shapes, seq = [(m, 32, h, v) for m, h, v in SMOKE_SHAPES], 16
    else:
        if args.tokens % SEQ:
            parser.error(f"--tokens must be a multiple of {SEQ}")
        shapes, seq = [(m, args.tokens, h, v) for name in args.model for m, h, v in SHAPES if m == name], SEQ
        if args.dry_run:
            for line in dry_run(shapes, args.skip):
                print(line)
            print("bench_losses --dry-run: arguments, imports and anchors checked; no CUDA call made")
            return []
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (use --smoke on CPU)")
        device, dtype, warmup, iters = torch.device("cuda"), torch.bfloat16, 2, args.iters or 10
    title = f"bench_losses{' --smoke' if args.smoke else ''}: fused linear + loss, {dtype}"
    notes = (f"{int(IGNORED * 100)}% ignored tokens; GRPO: one advantage per {seq}-token sequence, r = 1, token "
             "mean. x floor = fwd+bwd time / cuBLAS time of the logits, grad-hidden and grad-weight GEMMs on the "
             "trained tokens; TFLOP/s counts 6 N_trained H V; peak = memory above inputs and gradients; errors "
             "are relative to a float64 reference (norm-wise for gradients). Rows appended as measured.")
    stream = ResultsStream(title, environment(device), COLUMNS, notes=notes,
                           path=None if args.no_append else args.results)
    for model, n, h, v in shapes:
        bench_shape(model, n, h, v, device=device, dtype=dtype, smoke=args.smoke, warmup=warmup, iters=iters,
                    emit=stream.row, seq=seq, skip=args.skip)
    return stream.rows


if __name__ == "__main__":
    main()
