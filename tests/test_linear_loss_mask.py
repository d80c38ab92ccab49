"""The fused LM-head loss without a host sync (compact="mask", the NPU default) and its bf16 GEMM paths.

compact="mask" runs every row through the chunked pass with ignored rows zeroed; it must give what
compact="nonzero" (gather the trained rows with one nonzero) gives: forward outputs and the gradients of
hidden and weight, for cross-entropy and the policy loss, on the torch path and in the Triton interpreter
(TRITON_INTERPRET=1, set by conftest.py). A dispatch-mode trace proves that it has no host sync and no
data-dependent shape. No NPU runs here: the NPU choices are tested as the pure functions that make them.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_linear_loss_mask.py -q
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see conftest.py)

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ceiling_kernels.gemm import choose_gemm, gemm_plan
from ceiling_kernels.linear_loss import LinearLossFunction, resolve_compact
from ceiling_kernels.reference import linear_cross_entropy_reference, linear_policy_loss_reference
from engine.losses import _PolicyTerms, linear_cross_entropy, linear_policy_loss

BACKENDS = ["torch", "triton"]
aten = torch.ops.aten


def _packed_ignored(t):
    """Three packed sequences: a 4-token prompt at each start and the last token of each (its label would
    cross into the next sequence) are ignored."""
    starts = [0, t // 3, 2 * t // 3]
    ignored = torch.zeros(t, dtype=torch.bool)
    for s, e in zip(starts, starts[1:] + [t]):
        ignored[s:s + 4] = True
        ignored[e - 1] = True
    return ignored


# name: (T, H, V, chunk_size, ignored-row pattern). V > 256 gives several V tiles in the interpreter.
CASES = {
    "odd_shapes_several_chunks": (37, 40, 517, 8, lambda t, g: torch.rand(t, generator=g) < 0.3),
    "all_rows_ignored": (20, 40, 517, 8, lambda t, g: torch.ones(t, dtype=torch.bool)),
    "no_row_ignored": (37, 40, 517, 8, lambda t, g: torch.zeros(t, dtype=torch.bool)),
    "packed_boundaries": (45, 24, 301, 7, lambda t, g: _packed_ignored(t)),
    "h_wider_than_a_tile": (19, 300, 517, 5, lambda t, g: torch.rand(t, generator=g) < 0.4),
    "default_chunk": (37, 40, 517, None, lambda t, g: torch.rand(t, generator=g) < 0.3),
}


def _case(name, seed=0):
    t, h, v, chunk, pattern = CASES[name]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    targets = torch.randint(0, v, (t,), generator=g)
    ignored = pattern(t, g)
    if name == "packed_boundaries":  # what an ignored row holds must not matter: the mask path zeroes it
        hidden[ignored.nonzero()[:2, 0]] = math.nan
    return hidden, weight, targets, ignored, chunk


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _same(mask_path, nonzero_path, rtol=1e-5):
    """Equal up to fp32 summation order (grad_W sums its chunks in a different grouping)."""
    a, b = mask_path.detach().double(), nonzero_path.detach().double()
    assert a.shape == b.shape
    scale = b.abs().max().clamp(min=1e-30) if b.numel() else 1.0
    err = (a - b).abs().max() if b.numel() else 0.0
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} x {scale:.3g}"


def _ce(hidden, weight, labels, compact, backend, chunk):
    h, w = _leaf(hidden), _leaf(weight)
    loss = linear_cross_entropy(h, w, labels, backend=backend, chunk_size=chunk, compact=compact)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_cross_entropy_mask_equals_nonzero(name, backend):
    hidden, weight, targets, ignored, chunk = _case(name)
    labels = torch.where(ignored, -100, targets)
    mask = _ce(hidden, weight, labels, "mask", backend, chunk)
    nonzero = _ce(hidden, weight, labels, "nonzero", backend, chunk)
    for a, b in zip(mask, nonzero):
        _same(a, b)
    assert torch.all(mask[1][ignored] == 0)  # an ignored row's hidden gradient is exactly 0
    if name != "packed_boundaries":  # both agree with the float64 reference (NaN rows are outside its scope)
        ref_h, ref_w = _leaf(hidden.double()), _leaf(weight.double())
        ref = linear_cross_entropy_reference(ref_h, ref_w, labels)
        ref.backward()
        for a, b in zip(mask, (ref, ref_h.grad, ref_w.grad)):
            _same(a, b, rtol=2e-5)


def _policy_kwargs(targets, ignored, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = targets.numel()
    loss_mask = torch.where(ignored, 0.0, torch.rand(t, generator=g) + 0.5)  # fractional weights
    return dict(
        advantages=torch.where(ignored, math.nan, torch.randn(t, generator=g)),  # NaN where ignored: unused
        loss_mask=loss_mask,
        old_logp=torch.randn(t, generator=g) * 0.5 - 6.5,  # around log(1/V): ratios on both sides of the clips
        sft_weight=torch.randn(t, generator=g),
        pg_weight=torch.rand(t, generator=g) + 0.5,
        off_policy=torch.rand(t, generator=g) > 0.6,
        entropy_coef=0.05,
        clip_ratio_c=3.0,
        temperature=0.8,
    )


def _policy(hidden, weight, targets, kw, compact, backend, chunk):
    h, w = _leaf(hidden), _leaf(weight)
    out = linear_policy_loss(h, w, targets, backend=backend, chunk_size=chunk, compact=compact, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_policy_loss_mask_equals_nonzero(name, backend):
    hidden, weight, targets, ignored, chunk = _case(name)
    kw = _policy_kwargs(targets, ignored)
    mask, mask_gh, mask_gw = _policy(hidden, weight, targets, kw, "mask", backend, chunk)
    nonzero, nonzero_gh, nonzero_gw = _policy(hidden, weight, targets, kw, "nonzero", backend, chunk)
    for a, b in zip(mask, nonzero):  # loss, logp, entropy, clip fractions
        _same(a, b)
    _same(mask_gh, nonzero_gh)
    _same(mask_gw, nonzero_gw)
    assert torch.all(mask.logp[ignored] == 0) and torch.all(mask.entropy[ignored] == 0)
    assert torch.all(mask_gh[ignored] == 0)
    with torch.no_grad():  # the forward-only pass (rollout logp, validation) takes the same path
        fwd = linear_policy_loss(hidden, weight, targets, backend=backend, chunk_size=chunk, compact="mask", **kw)
    _same(fwd.loss, nonzero.loss)
    _same(fwd.logp, nonzero.logp)
    if name != "packed_boundaries":
        ref_h, ref_w = _leaf(hidden.double()), _leaf(weight.double())
        ref = linear_policy_loss_reference(ref_h, ref_w, targets, **kw)
        ref[0].backward()
        for a, b in zip((mask.loss, mask.logp, mask.entropy, mask_gh, mask_gw),
                        (ref[0], ref[1], ref[2], ref_h.grad, ref_w.grad)):
            _same(a, b, rtol=2e-5)


# ---------------------------------------------------------------------------------------------- no host sync


_SYNC_OPS = {aten.nonzero, aten._local_scalar_dense, aten.masked_select, aten.item}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _bool_index(func, args):
    if func.overloadpacket not in _INDEX_OPS:
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _OpTrace(TorchDispatchMode):
    """Every aten op that reaches the dispatcher, with its output shapes; host syncs and boolean indexing."""

    def __init__(self):
        super().__init__()
        self.trace, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in _SYNC_OPS or _bool_index(func, args):
            self.syncs.append(str(func))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.trace.append((str(func), tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def _traced_step(monkeypatch, loss_fn, hidden, weight):
    """Forward + backward under the op trace; Tensor.tolist / numpy (host reads without an aten op) counted."""
    host_reads = []
    for name in ("tolist", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k:
                            host_reads.append(_n) or _r(self, *a, **k))
    h, w = _leaf(hidden), _leaf(weight)
    with _OpTrace() as ops:
        loss = loss_fn(h, w)
        loss.backward()
    monkeypatch.undo()
    return ops, host_reads


@pytest.mark.parametrize("loss_name", ["cross_entropy", "policy"])
def test_mask_path_has_no_host_sync_and_no_data_dependent_shape(monkeypatch, loss_name):
    # The torch elementwise path (what an NPU runs); the Triton interpreter itself reads tensors on the host.
    hidden, weight, targets, _, _ = _case("odd_shapes_several_chunks")
    t = targets.numel()
    few = torch.arange(t) % 5 == 0  # 8 trained rows
    many = torch.arange(t) % 5 != 0  # 29 trained rows

    def loss_fn(trained, compact):
        if loss_name == "cross_entropy":
            labels = torch.where(trained, targets, -100)
            return lambda h, w: linear_cross_entropy(h, w, labels, backend="torch", chunk_size=8, compact=compact)
        kw = _policy_kwargs(targets, ~trained)
        return lambda h, w: linear_policy_loss(h, w, targets, backend="torch", chunk_size=8, compact=compact,
                                               **kw).loss

    loss_fn(few, "mask")(hidden, weight)  # warm-up: the one-time GEMM probe runs outside the trace
    traces = []
    for trained in (few, many):
        ops, host_reads = _traced_step(monkeypatch, loss_fn(trained, "mask"), hidden, weight)
        assert ops.syncs == [] and host_reads == [], (ops.syncs, host_reads)
        assert any("mm" in name for name, _ in ops.trace)  # the trace did see the pass
        traces.append(ops.trace)
    assert traces[0] == traces[1]  # same ops with the same shapes whatever the mask holds

    ops, _ = _traced_step(monkeypatch, loss_fn(few, "nonzero"), hidden, weight)
    assert "aten.nonzero.default" in ops.syncs  # the check sees the syncs the nonzero path does make
    assert "aten._local_scalar_dense.default" in ops.syncs  # its CPU target check reads a bool on the host


# ---------------------------------------------------------------------------------------------- edges


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_on_mask_path_is_nan(backend):
    hidden, weight, targets, ignored, chunk = _case("packed_boundaries")
    v = weight.shape[0]
    labels = torch.where(ignored, -100, targets)
    trained = (~ignored).nonzero()[:, 0]
    labels[trained[3]] = v + 5
    loss, gh, gw = _ce(hidden, weight, labels, "mask", backend, chunk)
    assert torch.isnan(loss) and torch.isnan(gh[trained[3]]).all() and torch.isnan(gw).any()
    kw = _policy_kwargs(targets, ignored)
    bad = targets.clone()
    bad[trained[3]] = -2
    out, _, _ = _policy(hidden, weight, bad, kw, "mask", backend, chunk)
    assert torch.isnan(out.loss) and torch.isnan(out.logp[trained[3]])
    assert torch.isfinite(out.logp[torch.arange(targets.numel()) != trained[3]]).all()
    # on an ignored row any target is fine, as on the nonzero path
    labels_ok = torch.where(ignored, -100, targets)
    targets_ok = torch.where(ignored, v + 100, targets)
    for a, b in zip(_ce(hidden, weight, labels_ok, "mask", backend, chunk),
                    _ce(hidden, weight, labels_ok, "nonzero", backend, chunk)):
        _same(a, b)
    ok, _, _ = _policy(hidden, weight, targets_ok, kw, "mask", backend, chunk)
    assert torch.isfinite(ok.loss)


def test_compact_choice():
    assert resolve_compact("auto", "cuda") == "nonzero"
    assert resolve_compact("auto", "cpu") == "nonzero"
    assert resolve_compact("auto", "npu") == "mask"
    assert resolve_compact("nonzero", "npu") == "nonzero" and resolve_compact("mask", "cpu") == "mask"
    hidden, weight, targets, _, _ = _case("no_row_ignored")
    with pytest.raises(ValueError, match="compact must be one of"):
        linear_cross_entropy(hidden, weight, targets, compact="gather")


def test_gemm_choice():
    bf16 = torch.bfloat16
    assert choose_gemm(bf16, "cuda", True) == "fp32_out"
    assert choose_gemm(bf16, "npu", True) == "fp32_out"  # torch_npu routes out_dtype to aclnnMm: used
    assert choose_gemm(bf16, "npu", False) == "bf16_out"
    assert choose_gemm(bf16, "cpu", False) == "upcast"
    assert choose_gemm(bf16, "cuda", False) == "upcast"  # torch < 2.8: as before
    assert choose_gemm(torch.float32, "npu", False, "bf16_out") == "upcast"  # only bf16 operands change
    assert choose_gemm(bf16, "cpu", False, "bf16_out") == "bf16_out"
    with pytest.raises(ValueError, match="does not run on cpu"):
        choose_gemm(bf16, "cpu", False, "fp32_out")
    with pytest.raises(ValueError, match="gemm must be one of"):
        choose_gemm(bf16, "cpu", False, "tf32")
    cpu = torch.device("cpu")
    assert gemm_plan(bf16, cpu) == (torch.float32, True)  # CPU has no mm.dtype_out: upcast, as before
    assert gemm_plan(bf16, cpu, "bf16_out") == (bf16, False)
    assert gemm_plan(torch.float64, cpu) == (torch.float64, True)


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("compact", ["nonzero", "mask"])
@pytest.mark.parametrize("accum", ["fp32", "weight"])
def test_bf16_out_gemm_is_as_accurate_as_eager_bf16(compact, accum):
    # The NPU's fallback (bf16 operands, fp32 accumulation, bf16 output widened) run on CPU, whose bf16 mm
    # also accumulates in fp32: error against float64 within 2x that of eager bf16 (bf16 GEMM, fp32 softmax).
    t, h, v = 96, 64, 1031
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(t, h, generator=g).bfloat16()
    weight = (torch.randn(v, h, generator=g) * 0.3).bfloat16()
    targets = torch.randint(0, v, (t,), generator=g)
    ignored = torch.rand(t, generator=g) < 0.3
    kw = _policy_kwargs(targets, ignored)
    kw.pop("temperature")
    terms = _PolicyTerms(kw["loss_mask"], kw["advantages"], kw["old_logp"], kw["sft_weight"], kw["pg_weight"],
                         kw["off_policy"], 0.2, 0.2, kw["clip_ratio_c"], 0.1, kw["entropy_coef"], None)
    opts = dict(chunk_size=32, elementwise="torch", grad_weight_accum=accum, compact=compact, gemm="bf16_out")
    h1, w1 = _leaf(hidden), _leaf(weight)
    loss, logp, _ = LinearLossFunction.apply(h1, w1, targets, terms.valid_T, terms, opts)
    loss.backward()
    assert h1.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.bfloat16
    h64, w64 = _leaf(hidden.double()), _leaf(weight.double())
    ref = linear_policy_loss_reference(h64, w64, targets, **kw)
    ref[0].backward()
    h2, w2 = _leaf(hidden), _leaf(weight)
    eager = linear_policy_loss_reference(h2, w2, targets, **kw)
    eager[0].backward()
    assert _rel(logp, ref[1]) <= 2 * _rel(eager[1], ref[1]) + 1e-6
    assert _rel(h1.grad, h64.grad) <= 2 * _rel(h2.grad, h64.grad) + 1e-6
    bound = 2 * _rel(w2.grad, w64.grad) if accum == "fp32" else math.sqrt(3) * 2 ** -8  # 3 chunks in bf16
    assert _rel(w1.grad, w64.grad) <= bound + 1e-6
    assert torch.all(h1.grad[ignored] == 0)
