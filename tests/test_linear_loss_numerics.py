"""The accuracy the fused loss promises on CUDA, checked on CPU by running its CUDA numerics.

On CUDA with bf16 inputs the driver runs its "fp32_out" GEMMs: bf16 operands, fp32-accumulated fp32 logits
(never rounded to bf16), G rounded to bf16 once (written over the logits), grad_h and grad_W accumulated in
fp32 and rounded to bf16 once in backward. The CPU has no bf16 -> fp32 GEMM kernel, so the probe finds none
there; with its result set, the same driver runs those GEMMs emulated (`gemm._mm_fp32_out`: operands widened,
products exact, fp32 sums), i.e. the CUDA path up to summation order. The elementwise work runs in the
plain-torch twins: the Triton interpreter rounds fp32 -> bf16 by truncation (1 + 2^-8 + 2^-12 -> 1.0), which
the GPU does not.

Inputs: a 512 x 256 x 8192 head whose logits have a per-token level in [64, 128) shared by the whole vocabulary
(a hidden coordinate against a constant weight column) and a spread of std 4 around it, with the greedy token
as target. Softmax ignores the level; rounding the logits to bf16 does not (spacing 0.5 there), so eager bf16
(bf16 logits) is off by > 5e-2 while the fused path stays near the bf16 rounding of G (~2.4e-3).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see conftest.py)

import torch  # noqa: E402

from ceiling_kernels import gemm  # noqa: E402
from ceiling_kernels import linear_loss as ll  # noqa: E402
from ceiling_kernels.reference import linear_policy_loss_reference  # noqa: E402
from engine.losses import _PolicyTerms, linear_policy_loss  # noqa: E402

CPU = torch.device("cpu")


def _head(t=512, h=256, v=8192, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 4 / (h - 1) ** 0.5
    hidden[:, 0] = 64 * (1 + torch.rand(t, generator=g))  # the per-token level of all its logits
    weight[:, 0] = 1
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    targets = (hidden.double() @ weight.double().T).argmax(1)
    kw = dict(advantages=torch.randn(t, generator=g), loss_mask=torch.rand(t, generator=g) > 0.1)
    return hidden, weight, targets, kw


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _rel(a, b):
    return ((a.detach().double() - b).norm() / b.norm()).item()


def _fused(hidden, weight, targets, kw):
    h, w = _leaf(hidden), _leaf(weight)
    out = linear_policy_loss(h, w, targets, backend="torch", chunk_size=128, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def test_grpo_gradients_on_the_cuda_path_stay_within_1e_2_where_bf16_logits_do_not(monkeypatch):
    hidden, weight, targets, kw = _head()
    h64, w64 = _leaf(hidden.double()), _leaf(weight.double())
    ref = linear_policy_loss_reference(h64, w64, targets, **kw)
    ref[0].backward()

    # Eager bf16 (bf16 logits, fp32 softmax, bf16 backward GEMMs): the inputs make logit rounding matter.
    h2, w2 = _leaf(hidden), _leaf(weight)
    eager = linear_policy_loss_reference(h2, w2, targets, **kw)
    eager[0].backward()
    assert _rel(h2.grad, h64.grad) > 5e-2 and _rel(w2.grad, w64.grad) > 5e-2

    # The same driver with bf16 logits (gemm="bf16_out", as on an NPU without fp32 output): as bad.
    terms = _PolicyTerms(kw["loss_mask"], kw["advantages"], None, None, None, None, 0.2, 0.2, None, 0.1, 0.0, None)
    _, _, _, gh, gw = ll.linear_loss_forward(hidden, weight, targets, terms.valid_T, terms, chunk_size=128,
                                             elementwise="torch", gemm="bf16_out")
    assert _rel(gh, h64.grad) > 5e-2 and _rel(gw, w64.grad) > 5e-2

    # The CUDA path: fp32 logits, G rounded to bf16 once, fp32 accumulation, gradients rounded to bf16 once.
    monkeypatch.setitem(gemm.FP32_OUT_OK, "cpu", (True, True))
    assert gemm.gemm_plan(torch.bfloat16, CPU) == (torch.bfloat16, True)
    out, gh, gw = _fused(hidden, weight, targets, kw)
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert _rel(out.logp, ref[1]) < 1e-4  # fp32 logits near 100: ulp 2^-17 x 100; bf16 ones: ~1e-1
    assert _rel(gh, h64.grad) < 1e-2 and _rel(gw, w64.grad) < 1e-2


def test_grad_weight_without_fp32_out_addmm_equals_the_fused_epilogue(monkeypatch):
    # CUDA torch 2.8 / 2.9: torch.mm takes out_dtype=float32 with bf16 operands, torch.addmm with an fp32 self
    # does not. The LM head must keep bf16 operands with fp32 output (not fall back to fp32 GEMMs, an fp32
    # copy of the weight) and add each chunk's grad_W through mm + add_, with the same result.
    hidden, weight, targets, kw = _head(t=96, h=64, v=1031)
    monkeypatch.setitem(gemm.FP32_OUT_OK, "cpu", (True, True))
    opts = dict(backend="torch", chunk_size=32)  # 3 chunks; grad_W accumulated in fp32 (the addmm's job)
    fused = linear_policy_loss(_leaf(hidden), _leaf(weight), targets, **kw, **opts)
    h1, w1 = _leaf(hidden), _leaf(weight)
    linear_policy_loss(h1, w1, targets, **kw, **opts).loss.backward()

    monkeypatch.setitem(gemm.FP32_OUT_OK, "cpu", (True, False))
    assert gemm.gemm_plan(torch.bfloat16, CPU) == (torch.bfloat16, True)  # still bf16 operands, fp32 output
    h2, w2 = _leaf(hidden), _leaf(weight)
    fallback = linear_policy_loss(h2, w2, targets, **kw, **opts)
    fallback.loss.backward()
    torch.testing.assert_close(fallback.loss, fused.loss, rtol=0, atol=0)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=0)  # grad_h never uses addmm
    torch.testing.assert_close(w2.grad.float(), w1.grad.float(), rtol=2 ** -8, atol=1e-6)

