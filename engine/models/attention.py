"""Attention over packed sequences (cu_seqlens), registered with transformers as "ceiling_packed".

A packed micro-batch is one row of T tokens holding B sequences; `cu_seqlens` (int32, B+1) marks
their boundaries. No token may attend across a boundary. Backends, picked once per process:

    varlen      torch.nn.attention.varlen.varlen_attn (CUDA, flash kernels, no [T, T] mask)
    flash_attn  flash_attn.flash_attn_varlen_func (CUDA, when the package is installed)
    npu_fusion  torch_npu.npu_fusion_attention in the TND varlen layout (Ascend; written against torch_npu's
                documented API, NOT run here: no NPU is available to this project)
    sdpa        one causal SDPA call over a right-padded view of the sequences: exact, any device (CPU)

`auto` takes flash_attn, then varlen, on CUDA, npu_fusion on NPU, and sdpa elsewhere. The sdpa and
npu_fusion paths need the sequence boundaries on the host: PackedCausalLM passes them once per forward
(`seq_ends_host`), so there is no device-to-host sync in every layer. The model receives cu_seqlens
through transformers' attention kwargs (`cu_seq_lens_q`, `max_length_q`); since this implementation
has no mask function registered, transformers builds no [T, T] mask for it.
Shapes: query_BHSD (B = 1 row), key/value_BKSD with K kv-heads (GQA), output_BSHD.
"""

from __future__ import annotations

import inspect
import logging
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from engine.errors import CeilingError

log = logging.getLogger("ceiling")

PACKED_ATTENTION = "ceiling_packed"
BACKENDS = ("auto", "varlen", "flash_attn", "npu_fusion", "sdpa")
NPU_CAUSAL_MASK_SIZE = 2048  # sparse_mode=3 takes a fixed 2048 x 2048 upper-triangular mask
_backend = "auto"


def set_attention_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    if name == "npu_fusion":
        try:
            import torch_npu  # noqa: F401
        except ImportError as exc:
            raise CeilingError("model.attention='npu_fusion' needs torch_npu (Ascend NPUs), which is not "
                               f"installed here ({exc}); use 'auto' or 'sdpa'") from exc
    global _backend
    _backend = name


def resolve_backend(device: torch.device) -> str:
    if _backend != "auto":
        return _backend
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attn"
        except ImportError:
            pass
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401

            return "varlen"
        except ImportError:
            pass
    if device.type == "npu":
        return "npu_fusion"
    return "sdpa"


def needs_host_boundaries(device: torch.device) -> bool:
    """Whether attention on `device` reads cu_seqlens on the host (then the caller hands them over once)."""
    return resolve_backend(device) in ("sdpa", "npu_fusion")


@lru_cache(maxsize=8)
def _slot_index(bounds: tuple[int, ...], max_len: int, device: torch.device) -> torch.Tensor:
    """Where each real token goes in the padded [B * max_len] view: token t of sequence b (starting at
    bounds[b]) to b * max_len + t - bounds[b]. Built on the host once per packed batch, not in every layer."""
    starts = np.asarray(bounds[:-1])
    offset = starts - np.arange(len(starts)) * max_len
    return torch.from_numpy(np.arange(bounds[-1]) - np.repeat(offset, np.diff(bounds))).to(device)


def _sdpa_padded(q_HTD, k_KTD, v_KTD, bounds: list[int], scale):
    """One causal SDPA call over the sequences scattered into a right-padded [B, H, L, D] view.

    Exact for every real token: with right padding, a causal query at position i only sees keys
    0..i of its own sequence, all real. Padded rows are computed and dropped. The scatter and gather
    are single index ops, so backward costs two index ops rather than one full-size copy per sequence.
    When padding would more than quadruple the work (one long sequence among many short ones), each
    sequence gets its own SDPA call instead.
    """
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    num_seqs, max_len, total = len(lengths), max(lengths, default=0), bounds[-1]
    gqa = q_HTD.shape[0] != k_KTD.shape[0]
    if num_seqs * max_len > 4 * total:
        out = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            q, k, v = (t[None, :, start:end] for t in (q_HTD, k_KTD, v_KTD))
            out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)[0])
        return torch.cat(out, dim=1)
    slot = _slot_index(tuple(bounds), max_len, q_HTD.device)

    def to_padded(x_HTD):
        flat = x_HTD.new_zeros(x_HTD.shape[0], num_seqs * max_len, x_HTD.shape[2]).index_copy(1, slot, x_HTD)
        return flat.view(x_HTD.shape[0], num_seqs, max_len, x_HTD.shape[2]).transpose(0, 1)

    out_BHLD = F.scaled_dot_product_attention(
        to_padded(q_HTD), to_padded(k_KTD), to_padded(v_KTD), is_causal=True, scale=scale, enable_gqa=gqa
    )
    out_HXD = out_BHLD.transpose(0, 1).reshape(q_HTD.shape[0], num_seqs * max_len, q_HTD.shape[2])
    return out_HXD.index_select(1, slot)


def _torch_varlen(q_THD, k_TKD, v_TKD, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if q_THD.shape[1] != k_TKD.shape[1] and "enable_gqa" not in params:  # older torch: expand kv heads
        rep = q_THD.shape[1] // k_TKD.shape[1]
        k_TKD, v_TKD = k_TKD.repeat_interleave(rep, dim=1), v_TKD.repeat_interleave(rep, dim=1)
    kwargs = {"scale": scale}
    if "is_causal" in params:  # torch <= 2.10 spelled causality as a flag
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q_THD.shape[1] != k_TKD.shape[1]
    return varlen_attn(q_THD, k_TKD, v_TKD, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


_npu_masks: dict[torch.device, torch.Tensor] = {}


def _npu_fusion_varlen(q_THD, k_TKD, v_TKD, seq_ends: list[int], scale):
    """Causal varlen attention on Ascend: TND layout, cumulative sequence ends as host lists (no sync).

    Written against torch_npu's documented `npu_fusion_attention`; NOT run here (no NPU available).
    """
    import torch_npu

    device = q_THD.device
    if device not in _npu_masks:  # sparse_mode=3 (right-down causal) takes this fixed compressed mask
        size = NPU_CAUSAL_MASK_SIZE
        _npu_masks[device] = torch.triu(torch.ones(size, size, dtype=torch.bool, device=device), diagonal=1)
    out = torch_npu.npu_fusion_attention(
        q_THD, k_TKD, v_TKD, q_THD.shape[1], "TND", atten_mask=_npu_masks[device], scale=scale,
        actual_seq_qlen=seq_ends, actual_seq_kvlen=seq_ends, sparse_mode=3)
    return out[0]


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        raise ValueError(
            f"the {PACKED_ATTENTION!r} attention implementation needs cu_seq_lens_q/max_length_q; "
            "use PackedCausalLM for packed batches and 'sdpa' for generation"
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one row of packed tokens, got batch {query.shape[0]}")
    max_seqlen = int(kwargs.get("max_length_q") or 0)
    backend = resolve_backend(query.device)
    seq_ends = kwargs.get("seq_ends_host")
    if backend in ("sdpa", "npu_fusion") and seq_ends is None:
        seq_ends = cu_seqlens[1:].tolist()  # a host sync per layer: callers should pass seq_ends_host
    if backend == "sdpa":
        out_HTD = _sdpa_padded(query[0], key[0], value[0], [0, *seq_ends], scaling)
        return out_HTD.transpose(0, 1)[None].contiguous(), None
    q_THD, k_TKD, v_TKD = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    if backend == "npu_fusion":
        return _npu_fusion_varlen(q_THD, k_TKD, v_TKD, list(seq_ends), scaling)[None], None
    cu_seqlens = cu_seqlens.to(torch.int32)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        out_THD = flash_attn_varlen_func(
            q_THD, k_TKD, v_TKD, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scaling, causal=True
        )
    else:
        out_THD = _torch_varlen(q_THD, k_TKD, v_TKD, cu_seqlens, max_seqlen, scaling)
    return out_THD[None], None


AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
