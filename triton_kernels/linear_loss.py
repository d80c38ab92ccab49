"""Fused LM head + per-token loss: target log-prob, entropy and their gradients, no [T, V] logits.

What it computes. For packed tokens t with hidden state h_t, LM-head weight W and target y_t:

    z_t      = W h_t                                  (logits, fp32 accumulators, never rounded to bf16)
    lse_t    = log sum_v exp(z_tv)
    logp_t   = z_{t,y_t} - lse_t                      (log-prob of the target)
    entropy_t = lse_t - sum_v p_tv z_tv,   p_t = softmax(z_t)

and, for a loss L = sum_t f_t(logp_t, entropy_t) whose per-token derivatives
c_t = dL/dlogp_t and e_t = dL/dentropy_t are supplied by the caller (`terms`, see below):

    dL/dz_tv = G_tv = c_t (onehot(y_t)_v - p_tv) - e_t p_tv (z_tv - sum_u p_tu z_tu)
    dL/dh_t  = sum_v G_tv W_v          dL/dW_v = sum_t G_tv h_t

The gradients are computed during the forward pass (one pass serves every algorithm: SFT, GRPO, DAPO,
LUFFY, SRFT, UPT differ only in c_t, e_t); the backward only scales them by grad_output.

How. Tokens with nothing to learn (loss mask 0 / ignored label) are compacted without a host sync:
rows are ordered valid-first by a stable argsort and every kernel reads the valid count `n_valid` from
device memory, skipping blocks past it (no FLOPs on them). Rows are gathered / scattered through the
permutation inside the kernels, so hidden is never copied. Per chunk of C sorted rows:

  1. `_linear_loss_fwd_kernel`, grid (C/BT, V/BV): z tile = h_tile @ W_tile^T with fp32 tl.dot, stored
     to an fp32 chunk buffer z_CV (only when gradients are needed); per V tile the partial softmax
     statistics (max m, sum exp(z-m), sum exp(z-m) z) and the target logit, read from the fp32
     accumulator. Torch combines the per-tile partials into lse, logp, entropy ([C] vectors).
  2. The caller's `terms.token_grads` turns (logp, entropy) into c_t, e_t (elementwise torch on [C]).
  3. `_linear_loss_grad_logits_kernel`, elementwise over z_CV: G = (c (onehot - p) - e p (z - Ez)) / s in
     fp32, stored in the compute dtype. s = max_t |c_t| + |e_t| keeps G O(1) so fp16 does not underflow;
     the GEMMs below multiply by s again in fp32. The entropy term is a constexpr and compiles out when
     no entropy gradient is requested (entropy is still returned as a metric).
  4. `_linear_loss_grad_hidden_kernel`: grad_h[rows] = s G @ W (fp32 accumulation, scattered to the
     original rows; masked rows stay 0).
  5. `_linear_loss_grad_weight_kernel`: grad_W (+)= s G^T @ h_chunk, the token loop bounded by n_valid;
     the first chunk writes, later chunks add in fp32 to the stored tile (grad_W is kept in the weight
     dtype, fp32 for fp16 weights, so no separate V x H fp32 buffer exists).

Transient memory: z_CV (fp32) + G_CV (compute dtype) + O(C V / BV) partials; C is chosen from a byte
budget (default 1 GiB, `chunk_size=` overrides). FLOPs: 6 T_valid H V, the three GEMMs.

Shapes (suffix legend): T tokens, H hidden, V vocab, C chunk rows, P = cdiv(V, BLOCK_V) V tiles.
  hidden h_TH, weight w_VH (row-major, may be a tied embedding), targets_T (int), valid_T (bool),
  z_CV fp32 chunk logits, g_CV chunk dL/dz, m_CP / s_CP / sz_CP softmax partials, logp_T / entropy_T fp32.

`terms` is any object with
  - `token_grads(idx_C, logp_C, entropy_C) -> (dlogp_C, dentropy_C or None)`: dL/dlogp and dL/dentropy for
    the original token indices idx_C (fp32, already including loss mask and normalizer);
  - `loss(logp_T, entropy_T) -> 0-d tensor`: the loss value from the per-token statistics;
  - `entropy_grad: bool`: whether dentropy can be non-zero (compiles the entropy gradient in).
`engine/losses.py` builds these for cross-entropy and the policy losses.

CPU: with TRITON_INTERPRET=1 the same kernels run on CPU tensors (bf16 tl.dot operands are upcast there,
the interpreter's bf16 dot is wrong). Tests:
    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_linear_loss.py -q
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _linear_loss_fwd_kernel(
    h_ptr, w_ptr, order_ptr, tgt_ptr, n_valid_ptr,
    z_ptr, m_ptr, s_ptr, sz_ptr, zt_ptr,
    row_start, n_rows, H, V, stride_h, stride_w, stride_z, stride_p,
    STORE_Z: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (row block, V tile): fp32 logits tile, optional store, softmax partials, target logit."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    if row_start + pid_t * BLOCK_T >= n_valid:
        return
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = (rows < n_rows) & (row_start + rows < n_valid)
    tok = tl.load(order_ptr + row_start + rows, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row_start + rows, mask=row_mask, other=-1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + tok[:, None] * stride_h + ks[None, :]
    b_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = (k0 + ks) < H
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if STORE_Z:
        z_ptrs = z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :]
        tl.store(z_ptrs, acc, mask=row_mask[:, None] & col_mask[None, :])
    z = tl.where(col_mask[None, :], acc, float("-inf"))
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, axis=1)
    sz = tl.sum(tl.where(col_mask[None, :], e * acc, 0.0), axis=1)
    p_off = rows * stride_p + pid_v
    tl.store(m_ptr + p_off, m, mask=row_mask)
    tl.store(s_ptr + p_off, s, mask=row_mask)
    tl.store(sz_ptr + p_off, sz, mask=row_mask)
    # The target logit comes from the fp32 accumulator of the one tile that holds it.
    is_tgt = cols[None, :] == tgt[:, None]
    zt = tl.sum(tl.where(is_tgt, acc, 0.0), axis=1)
    in_tile = (tgt >= pid_v * BLOCK_V) & (tgt < pid_v * BLOCK_V + BLOCK_V)
    tl.store(zt_ptr + rows, zt, mask=row_mask & in_tile)


@triton.jit
def _linear_loss_grad_logits_kernel(
    z_ptr, g_ptr, tgt_ptr, lse_ptr, ez_ptr, c_ptr, e_ptr, scale_ptr, n_valid_ptr,
    row_start, n_rows, V, stride_z, stride_g,
    HAS_ENTROPY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """G = (c (onehot - p) - e p (z - Ez)) / s for one (row block, V tile), fp32 until the store."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    if row_start + pid_t * BLOCK_T >= n_valid:
        return
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = (rows < n_rows) & (row_start + rows < n_valid)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = row_mask[:, None] & (cols < V)[None, :]
    inv_s = 1.0 / tl.load(scale_ptr)
    tgt = tl.load(tgt_ptr + row_start + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    c = tl.load(c_ptr + rows, mask=row_mask, other=0.0) * inv_s
    z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], mask=mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    g = tl.where(cols[None, :] == tgt[:, None], c[:, None], 0.0) - c[:, None] * p
    if HAS_ENTROPY:
        ez = tl.load(ez_ptr + rows, mask=row_mask, other=0.0)
        e = tl.load(e_ptr + rows, mask=row_mask, other=0.0) * inv_s
        g -= e[:, None] * p * (z - ez[:, None])
    tl.store(g_ptr + rows[:, None].to(tl.int64) * stride_g + cols[None, :],
             g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_loss_grad_hidden_kernel(
    g_ptr, w_ptr, gh_ptr, order_ptr, scale_ptr, n_valid_ptr,
    row_start, n_rows, H, V, stride_g, stride_w, stride_gh,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_h[order[rows]] = s * G[rows] @ W, reduced over V in fp32."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    if row_start + pid_t * BLOCK_T >= n_valid:
        return
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = (rows < n_rows) & (row_start + rows < n_valid)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hs < H
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = g_ptr + rows[:, None].to(tl.int64) * stride_g + ks[None, :]
    b_ptrs = w_ptr + ks[:, None].to(tl.int64) * stride_w + hs[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, V, BLOCK_K):
        k_mask = (k0 + ks) < V
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_w
    acc *= tl.load(scale_ptr)
    tok = tl.load(order_ptr + row_start + rows, mask=row_mask, other=0).to(tl.int64)
    tl.store(gh_ptr + tok[:, None] * stride_gh + hs[None, :], acc.to(gh_ptr.dtype.element_ty),
             mask=row_mask[:, None] & h_mask[None, :])


@triton.jit
def _linear_loss_grad_weight_kernel(
    g_ptr, h_ptr, gw_ptr, order_ptr, scale_ptr, n_valid_ptr,
    row_start, n_rows, H, V, stride_g, stride_h, stride_gw,
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_W[tile] (+)= s * G[:n, tile]^T @ h[order[:n]], n = valid rows of this chunk (device value)."""
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    n = tl.minimum(n_rows, n_valid - row_start)
    if ACCUMULATE:
        if n <= 0:
            return
    vs = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = vs < V
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hs < H
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        k_mask = (k0 + ks) < n
        tok = tl.load(order_ptr + row_start + k0 + ks, mask=k_mask, other=0).to(tl.int64)
        a = tl.load(g_ptr + (k0 + ks)[None, :].to(tl.int64) * stride_g + vs[:, None],
                    mask=v_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(h_ptr + tok[:, None] * stride_h + hs[None, :], mask=k_mask[:, None] & h_mask[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    acc *= tl.load(scale_ptr)
    gw_ptrs = gw_ptr + vs[:, None].to(tl.int64) * stride_gw + hs[None, :]
    mask = v_mask[:, None] & h_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(gw_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gw_ptrs, acc.to(gw_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _blocks(interpret: bool) -> dict:
    """Tile sizes: small in the CPU interpreter (speed), GEMM-sized on GPU."""
    if interpret:
        return dict(fwd=(32, 128, 64), logits=(32, 256), gh=(32, 64, 256), gw=(128, 64, 32), warps=1, stages=1)
    return dict(fwd=(128, 128, 64), logits=(16, 512), gh=(128, 128, 64), gw=(128, 128, 64), warps=8, stages=3)


def default_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, budget_bytes: int = 1 << 30) -> int:
    """Rows per chunk so that z_CV (fp32) + G_CV (compute dtype) fit in `budget_bytes`, a multiple of 128."""
    per_row = vocab * (4 + torch.empty((), dtype=dtype).element_size()) + 48 * triton.cdiv(vocab, 128)
    rows = max(128, budget_bytes // per_row // 128 * 128)
    return max(1, min(rows, n_tokens))


def linear_loss_forward(hidden_TH, weight_VH, targets_T, valid_T, terms, *, grad_hidden=True,
                        grad_weight=True, chunk_size=None):
    """Run the fused pass. Returns (loss, logp_T, entropy_T, grad_h_TH or None, grad_w_VH or None).

    logp_T / entropy_T are fp32 and 0 where `valid_T` is False. Gradients are those of `loss` (grad_output 1);
    grad_w is fp32 when the weight is fp16 (so small gradients do not underflow), else the weight dtype.
    No host synchronisation: the valid count stays on the device.
    """
    if hidden_TH.dtype != weight_VH.dtype:
        raise TypeError(f"hidden ({hidden_TH.dtype}) and weight ({weight_VH.dtype}) must share a dtype")
    T, H = hidden_TH.shape
    V = weight_VH.shape[0]
    dev = hidden_TH.device
    h = hidden_TH if hidden_TH.stride(1) == 1 else hidden_TH.contiguous()
    w = weight_VH if weight_VH.stride(1) == 1 else weight_VH.contiguous()
    need_grad = grad_hidden or grad_weight
    interpret = _interpreting()
    cfg = _blocks(interpret)
    upcast = interpret and h.dtype == torch.bfloat16
    precision = "tf32" if (h.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    gw_dtype = torch.float32 if w.dtype == torch.float16 else w.dtype

    valid_T = valid_T.to(torch.bool)
    order_T = torch.argsort((~valid_T).to(torch.int8), stable=True)  # valid rows first
    n_valid = valid_T.sum().to(torch.int32).reshape(1)
    tgt_sorted = torch.where(valid_T, targets_T, 0).to(torch.int32)[order_T].contiguous()

    logp_sorted = torch.zeros(T, dtype=torch.float32, device=dev)
    ent_sorted = torch.zeros(T, dtype=torch.float32, device=dev)
    grad_h = torch.zeros_like(h) if grad_hidden else None
    grad_w = (torch.zeros(w.shape, dtype=gw_dtype, device=dev) if T == 0 else
              torch.empty(w.shape, dtype=gw_dtype, device=dev)) if grad_weight else None

    C = chunk_size or default_chunk_size(T, V, h.dtype)
    C = max(1, min(C, T))
    BT, BV, BK = cfg["fwd"]
    P = triton.cdiv(V, BV)
    m_CP = torch.empty((C, P), dtype=torch.float32, device=dev)
    s_CP = torch.empty_like(m_CP)
    sz_CP = torch.empty_like(m_CP)
    zt_C = torch.empty(C, dtype=torch.float32, device=dev)
    z_CV = torch.empty((C, V), dtype=torch.float32, device=dev) if need_grad else m_CP
    g_CV = torch.empty((C, V), dtype=h.dtype, device=dev) if need_grad else None
    rows_C = torch.arange(C, device=dev)
    kw = dict(num_warps=cfg["warps"], num_stages=cfg["stages"])

    for start in range(0, T, C):
        n = min(C, T - start)
        ok_C = (start + rows_C[:n]) < n_valid
        _linear_loss_fwd_kernel[(triton.cdiv(n, BT), P)](
            h, w, order_T, tgt_sorted, n_valid, z_CV, m_CP, s_CP, sz_CP, zt_C,
            start, n, H, V, h.stride(0), w.stride(0), z_CV.stride(0), P,
            STORE_Z=need_grad, UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK_T=BT, BLOCK_V=BV, BLOCK_K=BK, **kw)
        # Combine per-tile partials; rows past n_valid hold garbage and are masked out.
        m, s, sz = m_CP[:n], s_CP[:n], sz_CP[:n]
        mx = m.max(dim=1).values
        scale = torch.exp(m - mx[:, None])
        tot = (s * scale).sum(dim=1)
        lse = mx + torch.log(tot)
        ez = (sz * scale).sum(dim=1) / tot
        logp = torch.where(ok_C, zt_C[:n] - lse, 0.0)
        ent = torch.where(ok_C, lse - ez, 0.0)
        logp_sorted[start:start + n] = logp
        ent_sorted[start:start + n] = ent
        if not need_grad:
            continue
        c, e = terms.token_grads(order_T[start:start + n], logp, ent)
        c = torch.where(ok_C, c.float(), 0.0)
        s_scale = c.abs().amax()
        if e is not None:
            e = torch.where(ok_C, e.float(), 0.0)
            s_scale = s_scale + e.abs().amax()
        s_scale = torch.where(s_scale > 0, s_scale, 1.0).reshape(1).contiguous()
        LT, LV = cfg["logits"]
        _linear_loss_grad_logits_kernel[(triton.cdiv(n, LT), triton.cdiv(V, LV))](
            z_CV, g_CV, tgt_sorted, lse.contiguous(), ez.contiguous(), c.contiguous(),
            c if e is None else e.contiguous(), s_scale, n_valid,
            start, n, V, z_CV.stride(0), g_CV.stride(0),
            HAS_ENTROPY=e is not None, BLOCK_T=LT, BLOCK_V=LV, num_warps=cfg["warps"])
        if grad_hidden:
            GT, GH, GK = cfg["gh"]
            _linear_loss_grad_hidden_kernel[(triton.cdiv(n, GT), triton.cdiv(H, GH))](
                g_CV, w, grad_h, order_T, s_scale, n_valid,
                start, n, H, V, g_CV.stride(0), w.stride(0), grad_h.stride(0),
                UPCAST=upcast, DOT_PRECISION=precision, BLOCK_T=GT, BLOCK_H=GH, BLOCK_K=GK, **kw)
        if grad_weight:
            WV, WH, WK = cfg["gw"]
            _linear_loss_grad_weight_kernel[(triton.cdiv(V, WV), triton.cdiv(H, WH))](
                g_CV, h, grad_w, order_T, s_scale, n_valid,
                start, n, H, V, g_CV.stride(0), h.stride(0), grad_w.stride(0),
                ACCUMULATE=start > 0, UPCAST=upcast, DOT_PRECISION=precision,
                BLOCK_V=WV, BLOCK_H=WH, BLOCK_K=WK, **kw)

    logp_T = torch.empty_like(logp_sorted).index_copy_(0, order_T, logp_sorted)
    entropy_T = torch.empty_like(ent_sorted).index_copy_(0, order_T, ent_sorted)
    loss = terms.loss(logp_T, entropy_T)
    return loss, logp_T, entropy_T, grad_h, grad_w


class LinearLossFunction(torch.autograd.Function):
    """loss, logp_T, entropy_T = LinearLossFunction.apply(hidden_TH, weight_VH, targets_T, valid_T, terms,
    chunk_size); gradients for hidden / weight are computed in forward and scaled by grad_output here."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, targets_T, valid_T, terms, chunk_size=None):
        loss, logp_T, entropy_T, grad_h, grad_w = linear_loss_forward(
            hidden_TH, weight_VH, targets_T, valid_T, terms, grad_hidden=ctx.needs_input_grad[0],
            grad_weight=ctx.needs_input_grad[1], chunk_size=chunk_size)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden_TH.dtype, weight_VH.dtype)
        ctx.mark_non_differentiable(logp_T, entropy_T)
        return loss, logp_T, entropy_T

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        return (*scale_saved_grads(ctx, grad_loss), None, None, None, None)


def scale_saved_grads(ctx, grad_loss):
    """Multiply the grads computed in forward by grad_output in place (no host sync, no copy)."""
    grad_h, grad_w = ctx.saved_tensors
    h_dtype, w_dtype = ctx.dtypes
    if grad_h is not None:
        grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype)).to(h_dtype)
    if grad_w is not None:
        grad_w = grad_w.mul_(grad_loss.to(grad_w.dtype)).to(w_dtype)
    return grad_h, grad_w
