"""Sequence packing: first-fit-decreasing micro-batches under a token budget, balanced over ranks.

A packed micro-batch is flat (no padding): the sequences are concatenated and `cu_seqlens` marks
their boundaries, so attention and the loss never cross from one sequence into the next.

    input_ids_T     token ids of all sequences, concatenated
    position_ids_T  0..len-1 within each sequence
    cu_seqlens_B1   int32 prefix sums of sequence lengths, [0, l0, l0+l1, ...]
    labels_T        next-token targets, already shifted within each sequence; -100 where no loss
                    (prompt tokens, and the last token of every sequence)

The packer itself is C++ (`csrc/packing.cpp`, module `engine._packing`). The pure-Python twin below
gives identical output and is used when the extension was not built; tests check both.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger("ceiling")

try:
    from engine import _packing as _native
except ImportError:  # built without a compiler, or running from a plain source tree
    _native = None

IGNORE_INDEX = -100
_warned = False


def native_available() -> bool:
    return _native is not None


def _warn_fallback_once() -> None:
    global _warned
    if not _warned:
        log.warning("C++ packer (engine._packing) not built; using the pure-Python packer (same output, slower)")
        _warned = True


# ---------------------------------------------------------------- pure-Python twin of csrc/packing.cpp


def ffd_pack_py(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing; the lowest-numbered bin with room is found with a max segment tree."""
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    for i, n in enumerate(lengths):
        if n <= 0 or n > budget:
            raise ValueError(f"sequence {i} has length {n}, outside [1, budget={budget}]")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep index order
    size = 1
    while size < max(len(lengths), 1):
        size <<= 1
    tree = [0] * (2 * size)
    for i in range(len(lengths)):
        tree[size + i] = budget
    for i in range(size - 1, 0, -1):
        tree[i] = max(tree[2 * i], tree[2 * i + 1])
    bins: list[list[int]] = []
    for idx in order:
        need = lengths[idx]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(idx)
        tree[node] -= need
        node >>= 1
        while node >= 1:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node >>= 1
    return bins


def balance_py(bin_tokens: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Longest-processing-time assignment with an equal number of bins per rank."""
    m = len(bin_tokens)
    if num_ranks <= 0:
        raise ValueError("num_ranks must be positive")
    if m % num_ranks:
        raise ValueError(f"{m} micro-batches do not divide evenly over {num_ranks} ranks")
    cap = m // num_ranks
    order = sorted(range(m), key=lambda i: -bin_tokens[i])
    heap = [(0, r) for r in range(num_ranks)]
    out: list[list[int]] = [[] for _ in range(num_ranks)]
    for idx in order:
        load, rank = heapq.heappop(heap)
        out[rank].append(idx)
        if len(out[rank]) < cap:
            heapq.heappush(heap, (load + bin_tokens[idx], rank))
    return out


# ---------------------------------------------------------------- public API


def ffd_pack(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Pack sequence lengths into micro-batches of at most `budget` tokens (lists of sequence indices)."""
    if _native is None:
        _warn_fallback_once()
        return ffd_pack_py(lengths, budget)
    return _native.ffd_pack([int(n) for n in lengths], int(budget))


def balance(bin_tokens: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Assign micro-batches to ranks: equal counts, balanced tokens (per-rank lists of bin indices)."""
    if _native is None:
        _warn_fallback_once()
        return balance_py(bin_tokens, num_ranks)
    return _native.balance([int(n) for n in bin_tokens], int(num_ranks))


def pack_for_ranks(lengths: Sequence[int], budget: int, num_ranks: int) -> list[list[list[int]]]:
    """Pack, then spread over ranks. Returns `plan[rank][micro_batch] = [sequence indices]`.

    Every rank gets the same number of micro-batches (FSDP's collectives run once per micro-batch on
    every rank). When the bin count is not a multiple of `num_ranks`, the fullest multi-sequence bins
    give their shortest sequence to a new bin; if no bin can be split, an empty micro-batch is added
    (the trainer runs it as a zero-loss dummy).
    """
    bins = ffd_pack(lengths, budget)
    while len(bins) % num_ranks or len(bins) < num_ranks:
        splittable = [i for i, b in enumerate(bins) if len(b) > 1]
        if not splittable:
            bins.append([])
            continue
        donor = max(splittable, key=lambda i: (sum(lengths[j] for j in bins[i]), -i))
        bins.append([bins[donor].pop()])
    tokens = [sum(lengths[j] for j in b) for b in bins]
    return [[bins[i] for i in rank_bins] for rank_bins in balance(tokens, num_ranks)]


@dataclass
class PackedBatch:
    """One flat micro-batch; see the module docstring for the fields."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor  # dataset index of each sequence, for diagnostics
    max_seqlen: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            self.cu_seqlens.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.sample_ids,
            self.max_seqlen,
        )


def collate_packed(
    input_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]], sample_ids: Sequence[int]
) -> PackedBatch:
    """Concatenate sequences into one PackedBatch; labels[t] = ids[t+1] where loss_mask[t+1] is set."""
    ids, pos, labels, cu = [], [], [], [0]
    for seq, mask in zip(input_ids, loss_masks, strict=True):
        n = len(seq)
        if len(mask) != n:
            raise ValueError(f"input_ids and loss_mask lengths differ ({n} vs {len(mask)})")
        ids.extend(seq)
        pos.extend(range(n))
        labels.extend(seq[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(n - 1))
        labels.append(IGNORE_INDEX)
        cu.append(cu[-1] + n)
    lengths = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        labels=torch.tensor(labels, dtype=torch.long),
        sample_ids=torch.tensor(list(sample_ids), dtype=torch.long),
        max_seqlen=max(lengths, default=0),
    )
