"""The three GEMMs of the fused LM-head loss (triton_kernels/linear_loss.py): logits, grad_h, grad_W.

Each runs with bf16 operands and fp32 output where the device can (no logits rounded to bf16, grad_W summed
in fp32 in the GEMM's epilogue), and falls back per device and torch version, decided by a probe run once per
process (`gemm_plan`, `fp32_out_gemms`). cuBLAS (or the NPU's Cube unit) does the work; this file only picks
the call.
"""

from __future__ import annotations

import warnings

import torch

GEMM_MODES = ("auto", "fp32_out", "bf16_out", "upcast")
# Device types whose bf16 torch.mm is used with bf16 output: Ascend NPU (torch_npu runs torch.mm as aclnnMm on
# the Cube unit, which accumulates fp16 / bf16 products in fp32 and rounds the output once). Never run here:
# no NPU in this project's CI; the choice itself is tested (tests/test_linear_loss_mask.py).
_BF16_OUT_DEVICE_TYPES = ("npu",)
# Per device type: (mm, addmm) with bf16 operands and fp32 output run (probed once per process; tests set it).
FP32_OUT_OK: dict[str, tuple[bool, bool]] = {}


def _probe_fp32_out(device: torch.device) -> tuple[bool, bool]:
    """Run the exact calls of `_mm_fp32_out` / `_addmm_fp32_out` once on 2 x 2 tensors, each on its own.

    CUDA: `torch.mm(bf16, bf16, out_dtype=float32)` since torch 2.8 (pytorch PR #150812); `torch.addmm` with
    that out_dtype and an fp32 `self` (the accumulator) only since torch 2.10 (PR #167931): on 2.8 / 2.9 the
    mm runs and the addmm does not. Ascend: CANN's aclnnMm / aclnnAddmm accept bf16 operands with a fp32
    output on Atlas A2/A3 ("16in32out", cann/ops-nn PR 5481), but torch_npu does not document a route from
    torch.mm's out_dtype to it, so the probe decides. CPU has no kernel for mm.dtype_out (torch 2.13): (False,
    False). Each result is read once on the host (one sync per process and device type, never per step).
    """
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32, out=acc)
        mm_ok = bool((acc == 2).all())
    except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
        mm_ok = False
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        addmm_ok = mm_ok and bool((acc == 4).all())
    except (RuntimeError, TypeError):
        addmm_ok = False
    if device.type == "cuda" and not mm_ok:
        warnings.warn("torch.mm(bf16, bf16, out_dtype=float32) is unavailable: the fused loss upcasts its GEMM "
                      "operands to fp32 (correct, several times slower, a fp32 copy of the weight); it needs "
                      f"torch >= 2.8 (this is {torch.__version__})", stacklevel=4)
    elif device.type == "cuda" and not addmm_ok:
        warnings.warn("torch.addmm(fp32, bf16, bf16, out_dtype=float32) is unavailable: the fused loss adds each "
                      "chunk's grad_W through a fp32 [V, H] temporary (torch.mm with fp32 output, then add_; "
                      f"V*H*4 more transient bytes); fused in the GEMM epilogue from torch 2.10 (this is "
                      f"{torch.__version__})", stacklevel=4)
    return mm_ok, addmm_ok


def fp32_out_gemms(device: torch.device) -> tuple[bool, bool]:
    """(mm, addmm): whether each bf16 x bf16 -> fp32 GEMM runs on this device type (see `_probe_fp32_out`)."""
    if device.type not in FP32_OUT_OK:
        FP32_OUT_OK[device.type] = _probe_fp32_out(device)
    return FP32_OUT_OK[device.type]


def fp32_out_gemm_available(device: torch.device) -> bool:
    """Whether the fp32-output GEMM path ("fp32_out") is available: it needs torch.mm's; addmm's is optional."""
    return fp32_out_gemms(device)[0]


def choose_gemm(dtype: torch.dtype, device_type: str, fp32_out_ok: bool, gemm: str = "auto") -> str:
    """How the three GEMMs run for operands of `dtype` ("fp32_out", "bf16_out" or "upcast"; see `gemm_plan`)."""
    if gemm not in GEMM_MODES:
        raise ValueError(f"gemm must be one of {GEMM_MODES}, got {gemm!r}")
    if dtype != torch.bfloat16:
        return "upcast"  # fp32 stays fp32, fp64 stays fp64 (the benchmarks' chunked reference), fp16 -> fp32
    if gemm == "fp32_out" and not fp32_out_ok:
        raise ValueError(f"gemm='fp32_out': torch.mm(bf16, bf16, out_dtype=float32) does not run on "
                         f"{device_type}; use gemm='bf16_out' or 'upcast'")
    if gemm != "auto":
        return gemm
    if fp32_out_ok:
        return "fp32_out"
    return "bf16_out" if device_type in _BF16_OUT_DEVICE_TYPES else "upcast"


def gemm_plan(dtype: torch.dtype, device: torch.device, gemm: str = "auto") -> tuple[torch.dtype, bool]:
    """(operand dtype of the three GEMMs, whether they write fp32 output directly).

    "fp32_out": bf16 operands, fp32 accumulation and output (cuBLAS through `torch.mm(..., out_dtype=float32)`;
      the logits are never rounded to bf16). Chosen by "auto" wherever the probe finds torch.mm's (CUDA
      torch >= 2.8); grad_W's accumulation uses addmm's where it runs too (torch >= 2.10), else mm + add_.
    "bf16_out": bf16 operands, fp32 accumulation inside the backend, bf16 output widened to fp32: the logits
      and grad_h rows are rounded to bf16 once (what eager `lm_head(h).float()` does), and with
      grad_weight_accum="fp32" each chunk's grad_W goes through a [V, H] bf16 temporary before the fp32 sum.
      Costs a [C, V] bf16 temporary for the logits. Chosen by "auto" on NPU without fp32 output: a plain
      bf16 `torch.mm` (aclnnMm), no torch_npu import.
      torch_npu's documented `npu_grouped_matmul` offers no fp32 output for bf16 operands either.
    "upcast": operands cast to fp32 (the weight once per call, hidden per chunk); exact fp32 GEMMs, several
      times slower than bf16 on tensor / Cube units. Chosen by "auto" everywhere else (CPU), and for every
      non-bf16 input.
    """
    probe = dtype == torch.bfloat16 and gemm in ("auto", "fp32_out")
    mode = choose_gemm(dtype, device.type, probe and fp32_out_gemm_available(device), gemm)
    if mode == "upcast":
        return (torch.float64 if dtype == torch.float64 else torch.float32), True
    return torch.bfloat16, mode == "fp32_out"


def _mm_fp32_out(a, b, out):
    """out = a @ b: bf16 operands, fp32 accumulation and output (cuBLAS through `out_dtype`).

    The CPU has no such kernel: there the operands are widened to fp32 per call and multiplied in fp32. bf16 ->
    fp32 is exact and so is every bf16 x bf16 product in fp32, so this is the same numerics up to summation
    order, and CPU tests run the CUDA path by setting the probe result (`FP32_OUT_OK`; "auto" never picks it
    on CPU, whose probe finds nothing)."""
    if a.device.type == "cpu":
        return torch.mm(a.float(), b.float(), out=out)
    return torch.mm(a, b, out_dtype=out.dtype, out=out)


def _addmm_fp32_out(acc, a, b, fused=True):
    """acc += a @ b with bf16 operands into the fp32 acc: in the GEMM's epilogue when `fused` (acc read and
    written once), else (CUDA torch < 2.10: no addmm with an fp32 self) through an fp32 temporary."""
    if not fused:
        return acc.add_(_mm_fp32_out(a, b, torch.empty_like(acc)))
    if a.device.type == "cpu":  # as in _mm_fp32_out
        return acc.addmm_(a.float(), b.float())
    return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


def mm_acc(a, b, out, fp32_out=True):
    """out = a @ b with out's (fp32 / fp64) output dtype."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if fp32_out:
        return _mm_fp32_out(a, b, out)
    return out.copy_(torch.mm(a, b))  # bf16 output (fp32 accumulation in the backend), widened


def addmm_acc(acc, a, b, fp32_out=True, fused=True):
    """acc += a @ b; with fp32 output, in the GEMM's epilogue where addmm has it (`fused`)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if fp32_out:
        return _addmm_fp32_out(acc, a, b, fused)
    return acc.add_(torch.mm(a, b))  # "bf16_out": a bf16 [V, H] temporary per chunk
