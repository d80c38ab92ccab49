"""Fused LM head + per-token loss: target log-prob, entropy and their gradients, no [T, V] logits.

What it computes. For the trained tokens t (loss mask != 0) with hidden state h_t, LM-head weight W,
target y_t and sampling temperature tau:

    z_t       = W h_t / tau                            (fp32 logits of one chunk of rows, never bf16)
    lse_t     = log sum_v exp(z_tv)
    logp_t    = z_{t,y_t} - lse_t                      (log-prob of the target)
    entropy_t = lse_t - Ez_t,   Ez_t = sum_v p_tv z_tv,  p_t = softmax(z_t)

and, for a loss L = sum_t f_t(logp_t, entropy_t) whose per-token derivatives c_t = dL/dlogp_t and
e_t = dL/dentropy_t the caller supplies (`terms`, below):

    dL/d(W h_t)_v = G_tv = (c_t (onehot(y_t)_v - p_tv) - e_t p_tv (z_tv - Ez_t)) / tau
    dL/dh_t = sum_v G_tv W_v          dL/dW_v = sum_t G_tv h_t

The gradients are computed during the forward pass: one pass serves every algorithm (SFT, GRPO, DAPO,
LUFFY, SRFT, UPT differ only in c_t, e_t); the backward only scales them by grad_output.

How, per chunk of C rows. Which rows: compact="nonzero" (default on CUDA / CPU) lists the trained rows with
one `nonzero` (one device->host sync), so every GEMM is sized to the trained tokens and ignored rows are never
touched; compact="mask" (default elsewhere, e.g. Ascend NPU, where a host sync stalls the launch queue) walks
all T rows in fixed-size chunks with ignored rows zeroed: no sync, but GEMM work for ignored tokens too
(see `linear_loss_forward`).

  1. GEMM (cuBLAS): z_CV = h_C @ W^T with fp32 output (`torch.mm(..., out_dtype=float32)` on CUDA for
     bf16 inputs: bf16 operands, fp32 accumulate and store, so logits are never rounded to bf16). Devices
     without that: `gemm_plan` in gemm.py (bf16 output widened to fp32 on NPU, fp32 operands elsewhere).
  2. `_row_stats_kernel` (Triton, one program per row, online softmax over V tiles): lse, logp, entropy,
     Ez from z / tau in one read of z.
  3. `terms.token_grads` (torch on [C] vectors): c_t, e_t.
  4. `_grad_logits_kernel` (Triton, one program per row, V tiles in order): G, written IN PLACE over z
     (bf16 G over the fp32 buffer: tile k writes bytes the sweep has already read, ordered across warps by
     a few CTA barriers per row; see the kernel), so no second buffer.
  5. GEMM: grad_h[rows] = G @ W (fp32 output, scattered to the rows).
  6. GEMM: grad_W += G^T @ h_C, accumulated in an fp32 buffer through cuBLAS's epilogue
     (`addmm(..., out_dtype=float32)`): grad_W is read and written once per chunk, and rounded to the
     weight dtype exactly once, in backward. (CUDA torch 2.8 / 2.9 lack that addmm: an fp32 [V, H]
     temporary from `mm(..., out_dtype=float32)`, then `add_`.) `grad_weight_accum="weight"` accumulates in the weight dtype
     instead (saves V*H*2 bytes for bf16; one bf16 rounding per chunk: relative error <= n_chunks * 2^-8
     elementwise in the worst case, about sqrt(n_chunks) * 2^-9 rms; tested).

Budget at the Qwen2.5-7B head, T = 16384 trained tokens, H = 3584, V = 152064, bf16, one H100 SXM
(~3.35 TB/s; the three cuBLAS GEMMs alone measured 76.5 ms there, the floor: 6 T H V = 5.36e13 FLOP):
  | pass                    | FLOP     | bytes (all chunks)                      | predicted           |
  |-------------------------|----------|-----------------------------------------|---------------------|
  | 1 logits GEMM           | 2 T H V  | fp32 out 4 T V = 10.0 GB (epilogue)     | floor share, hidden |
  | 2 row stats             | ~6 T V   | read 4 T V = 10.0 GB                    | 3.0-3.4 ms          |
  | 4 grad logits (in place)| ~8 T V   | read 4 T V + write 2 T V = 15.0 GB      | 4.5-5.1 ms          |
  | 5 grad_h GEMM           | 2 T H V  | G 2 T V, in floor                       | floor share         |
  | 6 grad_W GEMM, fp32 acc | 2 T H V  | + 8 V H per chunk = 4.4 GB x 9 chunks   | hidden when the     |
  |                         |          |                                         | GEMM is compute-bound (C >= ~1k) |
  | token grads (torch)     | -        | ~15 tiny kernels per chunk              | ~0.7 ms             |
  | backward scaling        | -        | grad_W fp32 -> bf16: 6 V H = 3.3 GB     | 1.0 ms              |
  Predicted total ~87 ms = 1.13x the floor (1.28x if the grad_W epilogue were not hidden at all).
  Transient memory: z chunk (C V 4 B; default budget 1 GiB -> C = 1765 rows here) + the fp32 grad_W
  buffer beyond the bf16 grad (V H 2 B = 1.02 GiB; 0 with grad_weight_accum="weight") + fp32 grad_h
  (T H 4 B = 0.22 GiB). None of these predictions has been measured yet: no GPU was lent to the session
  that wrote this design (benchmarks/gpu_check.sh measures it).

Shapes (suffix legend): T tokens, N trained tokens, H hidden, V vocab, C chunk rows.
  hidden h_TH, weight w_VH (may be a tied embedding), targets_T (int), valid_T (bool), idx_N (int64),
  z_CV fp32 chunk logits (G overwrites it), logp_T / entropy_T fp32.

`terms` is any object with
  - `token_grads(idx_C, logp_C, entropy_C) -> (dlogp_C, dentropy_C or None)`: dL/dlogp and dL/dentropy for
    the original token indices idx_C, an int64 tensor (compact="nonzero") or a slice of rows (compact="mask")
    (fp32, already including loss mask and normalizer);
  - `loss(logp_T, entropy_T) -> 0-d tensor`: the loss value from the per-token statistics;
  - `entropy_grad: bool`: whether dentropy can be non-zero (compiles the entropy gradient in).
`engine/losses.py` builds these for cross-entropy and the policy losses.

Elementwise backends: "triton" (the two kernels; on CPU they run with TRITON_INTERPRET=1) and "torch"
(`_row_stats_torch` / `_grad_logits_torch`, the same math in plain PyTorch, for CPU without the
interpreter). The GEMMs are torch in both. Tests:
    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_linear_loss.py -q
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ceiling_kernels.gemm import addmm_acc, fp32_out_gemms, gemm_plan, mm_acc


def _row_stats_kernel(z_ptr, tgt_ptr, lse_ptr, logp_ptr, ent_ptr, ez_ptr, V, stride_z, inv_t,
                      BLOCK_V: tl.constexpr):
    """One row: online max / sum exp / sum exp*z over V tiles of z / tau, then lse, logp, entropy, Ez.

    The loop-carried statistics take the outputs' dtype (fp32, fp64 for fp64 inputs: `row_stats_triton`):
    a literal start (`m = float("-inf")`) is fp32, and Triton rejects a loop variable that turns fp64."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    acc_ty = lse_ptr.dtype.element_ty
    m = tl.full((), float("-inf"), acc_ty)
    s = tl.zeros((), acc_ty)
    sz = tl.zeros((), acc_ty)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(acc_ty) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * alpha + tl.sum(e, axis=0)
        sz = sz * alpha + tl.sum(e * tl.where(mask, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    ez = sz / s
    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    zt = tl.load(z_row + tgt).to(acc_ty) * inv_t
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, zt - lse)
    tl.store(ent_ptr + row, lse - ez)
    tl.store(ez_ptr + row, ez)


def _grad_logits_kernel(z_ptr, g_ptr, tgt_ptr, lse_ptr, ez_ptr, c_ptr, e_ptr, V, stride_z, stride_g, inv_t,
                        HAS_ENTROPY: tl.constexpr, HALF_IN_PLACE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: G = (c (onehot - p) - e p (z - Ez)) / tau, V tiles k = 0, 1, ... in order.

    HALF_IN_PLACE: G is a half-width view over the same bytes as z (bf16 G over the fp32 logits, row for
    row: g_row starts at z_row's address, stride_g = 2 stride_z). Each tile's load and store are spread over
    all warps, and G tile k (bf16 columns [kB, (k+1)B), B = BLOCK_V) lands on the bytes of fp32 columns
    [kB/2, (k+1)B/2), which other threads load in tile floor(k/2): in the same iteration for k = 0, earlier
    ones after. Warps are not in lockstep, so one warp's stores could overwrite logits another warp has
    not loaded yet (the same hazard for any k, should a warp fall ceil(k/2) tiles behind). Order: a CTA
    barrier after tile j's loads and before its stores makes every thread's loads of tiles <= j complete
    before any thread stores tile j or later. Barriers at j = 0, 1, 2, 4, 8, ... suffice: the last one
    before G tile k is at j = 0 (k = 0) or at the largest power of two <= k, which is > k / 2 >= floor(k/2).
    About log2(V / B) + 2 barriers per row (7 at V = 152064, B = 4096) instead of one per tile. No later
    tile reads what tile k wrote (tile k' reads fp32 bytes [4k'B, 4(k'+1)B), disjoint from [2kB, 2(k+1)B)
    for k' > floor(k/2)), and rows never share bytes. Without HALF_IN_PLACE (G in its own buffer, or fp32 G
    over fp32 z: each element stored by the thread that loaded it) there is nothing to order.
    tests/test_kernels_aot.py checks the barrier in the compiled PTX.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * stride_g
    tgt = tl.load(tgt_ptr + row)
    lse = tl.load(lse_ptr + row)
    c = tl.load(c_ptr + row) * inv_t
    if HAS_ENTROPY:
        ez = tl.load(ez_ptr + row)
        e = tl.load(e_ptr + row) * inv_t
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0) * inv_t
        p = tl.exp(z - lse)
        g = tl.where(cols == tgt, c, 0.0) - c * p
        if HAS_ENTROPY:
            g -= e * p * (z - ez)
        if HALF_IN_PLACE:
            k = v0 // BLOCK_V
            if (k & (k - 1)) == 0:  # k = 0, 1, 2, 4, 8, ...: see the docstring
                tl.debug_barrier()
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_JITTED: dict = {}


def _jit(kernel):
    """triton.jit(kernel), decorated on first launch: Triton fixes interpreter or compiled mode when it
    decorates, and the torch path imports this module too, so the choice waits until a kernel really runs."""
    key = (kernel, _interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(kernel)
    return _JITTED[key]


def _block_v(V: int) -> int:
    """V tile of the row kernels: small in the CPU interpreter (speed), 4096 on GPU (16 KiB of fp32 per load)."""
    cap = 256 if _interpreting() else 4096
    return min(cap, triton.next_power_of_2(max(V, 16)))


def _num_warps() -> int:
    """Warps per row program: 8 on GPU (256 threads, 16 fp32 per thread per 4096-wide tile), 1 interpreted."""
    return 1 if _interpreting() else 8


def row_stats_triton(z_CV, tgt_C, inv_t, block_v=None):
    """(lse, logp, entropy, Ez) per row of z_CV / tau, [C] each: fp64 for fp64 z, fp32 otherwise."""
    C, V = z_CV.shape
    out = torch.empty((4, C), dtype=torch.float64 if z_CV.dtype == torch.float64 else torch.float32,
                      device=z_CV.device)
    if C:
        bv = block_v or _block_v(V)
        _jit(_row_stats_kernel)[(C,)](z_CV, tgt_C, out[0], out[1], out[2], out[3], V, z_CV.stride(0), inv_t,
                                      BLOCK_V=bv, num_warps=_num_warps())
    return out[0], out[1], out[2], out[3]


def _half_in_place(z_CV, g_CV) -> bool:
    """Whether g_CV is a narrower view over z_CV's bytes (the driver's bf16 G over fp32 logits), which
    `_grad_logits_kernel` must order (HALF_IN_PLACE). Other overlaps are outside its argument: refused."""
    if g_CV.untyped_storage().data_ptr() != z_CV.untyped_storage().data_ptr():
        return False
    if g_CV.dtype == z_CV.dtype and g_CV.data_ptr() == z_CV.data_ptr() and g_CV.stride() == z_CV.stride():
        return False  # same element, same thread: nothing to order
    if (g_CV.data_ptr() == z_CV.data_ptr() and 2 * g_CV.element_size() == z_CV.element_size()
            and g_CV.stride(0) == 2 * z_CV.stride(0) and g_CV.stride(1) == z_CV.stride(1) == 1):
        return True
    raise ValueError("grad_logits: g_CV overlaps z_CV other than in place or as its half-width view")


def grad_logits_triton(z_CV, g_CV, tgt_C, lse_C, ez_C, c_C, e_C, inv_t, block_v=None):
    """Write G (see the module docstring) into g_CV, which may be z_CV itself or its half-width view."""
    C, V = z_CV.shape
    if C:
        bv = block_v or _block_v(V)
        _jit(_grad_logits_kernel)[(C,)](z_CV, g_CV, tgt_C, lse_C, ez_C, c_C, c_C if e_C is None else e_C, V,
                                        z_CV.stride(0), g_CV.stride(0), inv_t, HAS_ENTROPY=e_C is not None,
                                        HALF_IN_PLACE=_half_in_place(z_CV, g_CV), BLOCK_V=bv,
                                        num_warps=_num_warps())


def row_stats_torch(z_CV, tgt_C, inv_t, block_v=None):
    """Plain-PyTorch twin of `row_stats_triton`."""
    z = z_CV * inv_t
    lse = torch.logsumexp(z, dim=1)
    ez = (torch.softmax(z, dim=1) * z).sum(dim=1)
    logp = z.gather(1, tgt_C.long()[:, None])[:, 0] - lse
    return lse, logp, lse - ez, ez


def grad_logits_torch(z_CV, g_CV, tgt_C, lse_C, ez_C, c_C, e_C, inv_t, block_v=None):
    """Plain-PyTorch twin of `grad_logits_triton` (materialises C x V temporaries; CPU only)."""
    z = z_CV * inv_t
    p = torch.exp(z - lse_C[:, None])
    c = c_C * inv_t
    g = -c[:, None] * p
    g.scatter_add_(1, tgt_C.long()[:, None], c[:, None])
    if e_C is not None:
        g -= (e_C * inv_t)[:, None] * p * (z - ez_C[:, None])
    g_CV.copy_(g)


ELEMENTWISE = {"triton": (row_stats_triton, grad_logits_triton), "torch": (row_stats_torch, grad_logits_torch)}


# ---------------------------------------------------------------------------------------------- driver


def default_chunk_size(n_tokens: int, vocab: int, budget_bytes: int = 1 << 30) -> int:
    """Rows per chunk so that the fp32 chunk logits z_CV fit in `budget_bytes` (G overwrites them)."""
    rows = max(128, budget_bytes // (4 * max(vocab, 1)))
    return max(1, min(rows, n_tokens))


COMPACT_MODES = ("auto", "nonzero", "mask")


def resolve_compact(compact: str, device_type: str) -> str:
    """"auto" -> "nonzero" on CUDA and CPU (a sync is cheap there and ignored rows cost nothing), "mask" on
    every other accelerator (NPU: a host sync stalls the launch queue)."""
    if compact not in COMPACT_MODES:
        raise ValueError(f"compact must be one of {COMPACT_MODES}, got {compact!r}")
    if compact != "auto":
        return compact
    return "nonzero" if device_type in ("cuda", "cpu") else "mask"


def _trained_targets(targets_T, valid_T, V, dev):
    """compact="nonzero": the trained rows idx_N (the one host sync) and their targets as int32, checked."""
    idx_N = valid_T.nonzero()[:, 0]
    tgt_N = targets_T[idx_N]
    if idx_N.numel():
        in_range = ((tgt_N >= 0) & (tgt_N < V)).all()
        if dev.type == "cuda":
            torch._assert_async(in_range, "linear loss: a trained target is outside [0, vocab)")
        elif not bool(in_range):
            bad = tgt_N[(tgt_N < 0) | (tgt_N >= V)][0].item()
            raise ValueError(f"target {bad} of a trained token is outside [0, {V}) (vocab size)")
    return idx_N, tgt_N.to(torch.int32)


def _masked_targets(targets_T, valid_T, V, dev, fdt):
    """compact="mask": targets safe to read for every row (0 on ignored or out-of-range rows) and a [T] poison,
    NaN on trained rows whose target is outside [0, V), else 0. Raising would need the host; instead the
    poison makes that token's logp, the loss and the gradients NaN (CUDA also raises asynchronously)."""
    bad_T = valid_T & ((targets_T < 0) | (targets_T >= V))
    if dev.type == "cuda":
        torch._assert_async(~bad_T.any(), "linear loss: a trained target is outside [0, vocab)")
    tgt_T = torch.where(valid_T & ~bad_T, targets_T, 0).to(torch.int32)
    return tgt_T, torch.where(bad_T, torch.nan, 0.0).to(fdt)


def linear_loss_forward(hidden_TH, weight_VH, targets_T, valid_T, terms, *, grad_hidden=True, grad_weight=True,
                        chunk_size=None, temperature=1.0, elementwise="triton", grad_weight_accum="fp32",
                        block_v=None, compact="auto", gemm="auto"):
    """Run the fused pass. Returns (loss, logp_T, entropy_T, grad_h or None, grad_w or None).

    logp_T / entropy_T are fp32 (fp64 for fp64 inputs) of softmax(z / temperature), 0 where `valid_T` is False.
    The gradients are those of `loss` (grad_output 1): grad_h fp32 [T, H]; grad_w fp32 [V, H] (bf16 with
    grad_weight_accum="weight" on a bf16 GEMM path).

    compact: how the rows to train are found.
      "nonzero": one `valid_T.nonzero()` (a device->host sync) lists the trained rows; chunks hold trained rows
        only, so every GEMM is sized to the N trained tokens. A trained target outside [0, V) raises
        ValueError (CPU) or a device-side assert (CUDA).
      "mask": all T rows in chunks of fixed size (every shape follows from T), no nonzero / item / boolean
        indexing in forward or backward. An ignored row's hidden state is zeroed before its GEMM and its
        dlogp / dentropy are 0, so its G row, grad_h row and grad_W share are exactly 0; its logp and entropy
        are 0 as on the nonzero path. Cost: the GEMMs and row kernels run on ignored rows too, T / N times the
        nonzero path's work (RL prompt tokens are not free: 25% prompt tokens -> 1.33x the LM-head FLOP),
        plus one [C, H] select per chunk. A trained target outside [0, V) makes its logp, the loss and the
        gradients NaN (and raises asynchronously on CUDA) instead of raising on the host.
      "auto": `resolve_compact` ("nonzero" on CUDA / CPU, "mask" elsewhere, e.g. NPU).
    gemm: "auto" | "fp32_out" | "bf16_out" | "upcast", how bf16 operands are multiplied (see `gemm_plan`).
    """
    if hidden_TH.dtype != weight_VH.dtype:
        raise TypeError(f"hidden ({hidden_TH.dtype}) and weight ({weight_VH.dtype}) must share a dtype")
    if grad_weight_accum not in ("fp32", "weight"):
        raise ValueError(f"grad_weight_accum must be 'fp32' or 'weight', got {grad_weight_accum!r}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    stats_fn, grad_fn = ELEMENTWISE[elementwise]
    T, H = hidden_TH.shape
    V = weight_VH.shape[0]
    dev = hidden_TH.device
    inv_t = 1.0 / float(temperature)
    masked = resolve_compact(compact, dev.type) == "mask"
    gdt, fp32_out = gemm_plan(hidden_TH.dtype, dev, gemm)
    fused_addmm = not (fp32_out and gdt == torch.bfloat16) or fp32_out_gemms(dev)[1]
    fdt = torch.float64 if gdt == torch.float64 else torch.float32  # logits, statistics, accumulators
    valid_T = valid_T.to(torch.bool)
    if masked:
        tgt_T, poison_T = _masked_targets(targets_T, valid_T, V, dev, fdt)
        n_rows = T
    else:
        idx_N, tgt_N = _trained_targets(targets_T, valid_T, V, dev)
        n_rows = idx_N.numel()

    w = weight_VH.to(gdt)  # no copy when the dtypes agree (the bf16 GEMM paths)
    logp_T = torch.zeros(T, dtype=fdt, device=dev)
    entropy_T = torch.zeros(T, dtype=fdt, device=dev)
    need_grad = grad_hidden or grad_weight
    grad_h = torch.zeros((T, H), dtype=fdt, device=dev) if grad_hidden else None
    acc_dtype = gdt if (grad_weight_accum == "weight" and gdt == torch.bfloat16) else fdt
    grad_w = torch.zeros((V, H), dtype=acc_dtype, device=dev) if grad_weight else None

    C = max(1, min(chunk_size or default_chunk_size(n_rows, V), max(n_rows, 1)))
    z_buf = torch.empty((C, V), dtype=fdt, device=dev) if n_rows else None
    for start in range(0, n_rows, C):
        if masked:  # rows [start, stop): a view; ignored rows enter the GEMM as zeros
            rows = slice(start, min(start + C, T))
            keep = valid_T[rows]
            tgt = tgt_T[rows]
            h_C = torch.where(keep[:, None], hidden_TH[rows], 0).to(gdt)
        else:  # trained rows only, gathered
            rows = idx_N[start:start + C]
            tgt = tgt_N[start:start + C]
            h_C = hidden_TH.index_select(0, rows).to(gdt)
        n = h_C.shape[0]
        z = mm_acc(h_C, w.T, z_buf[:n], fp32_out)
        lse, logp, ent, ez = stats_fn(z, tgt, inv_t, block_v)
        if masked:
            logp = torch.where(keep, logp + poison_T[rows], 0)
            ent = torch.where(keep, ent, 0)
        logp_T[rows] = logp
        entropy_T[rows] = ent
        if not need_grad:
            continue
        c, e = terms.token_grads(rows, logp, ent)
        if masked:  # exactly 0 on ignored rows, NaN on a trained row with an out-of-range target
            c = torch.where(keep, c + poison_T[rows], 0)
            e = None if e is None else torch.where(keep, e, 0)
        c = c.to(fdt).contiguous()
        e = None if e is None else e.to(fdt).contiguous()
        g = z if gdt == fdt else z.view(gdt)[:, :V]  # in place: G overwrites the logits
        grad_fn(z, g, tgt, lse, ez, c, e, inv_t, block_v)
        if grad_hidden and masked:
            mm_acc(g, w, grad_h[rows], fp32_out)
        elif grad_hidden:
            grad_h.index_copy_(0, rows, mm_acc(g, w, torch.empty((n, H), dtype=fdt, device=dev), fp32_out))
        if grad_weight:
            addmm_acc(grad_w, g.T, h_C, fp32_out, fused_addmm)
    loss = terms.loss(logp_T, entropy_T)
    return loss, logp_T, entropy_T, grad_h, grad_w


class LinearLossFunction(torch.autograd.Function):
    """loss, logp_T, entropy_T = LinearLossFunction.apply(hidden_TH, weight_VH, targets_T, valid_T, terms, opts).

    Gradients are computed in forward (`linear_loss_forward`, with the keyword options `opts`) and saved;
    backward returns them times grad_output, rounded once to the input dtypes. The saved gradients are never
    modified, so a second backward (retain_graph=True) gives the same result.
    """

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, targets_T, valid_T, terms, opts):
        loss, logp_T, entropy_T, grad_h, grad_w = linear_loss_forward(
            hidden_TH, weight_VH, targets_T, valid_T, terms, grad_hidden=ctx.needs_input_grad[0],
            grad_weight=ctx.needs_input_grad[1], **opts)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden_TH.dtype, weight_VH.dtype)
        ctx.mark_non_differentiable(logp_T, entropy_T)
        return loss, logp_T, entropy_T

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return scale_grad(grad_h, grad_loss, h_dtype), scale_grad(grad_w, grad_loss, w_dtype), None, None, None, None


def scale_grad(grad, grad_loss, dtype):
    """grad * grad_output in fp32, rounded once to `dtype`, into a new tensor (the saved grad is untouched)."""
    if grad is None:
        return None
    if grad.dtype not in (torch.float32, torch.float64):  # grad_weight_accum="weight": scale in fp32 all the same
        return (grad.float() * grad_loss.float()).to(dtype)
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    return torch.mul(grad, grad_loss.to(grad.dtype), out=out)
