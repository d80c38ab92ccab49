"""Weight sync from the (FSDP2-sharded) policy to a rollout engine, and its verification.

    for bucket in iter_weight_buckets(model, bucket_bytes=512 << 20, dtype=torch.bfloat16):
        engine_load(bucket)              # [(hf_name, full_tensor), ...]; collective: every rank iterates

Why buckets: the full state dict of a 7B model is 15-30 GB; gathering it at once would double the trainer's
peak memory. `iter_weight_buckets` gathers one parameter at a time (`DTensor.full_tensor()`, an all-gather
every rank joins in the same order, of the shards already cast to the engine's dtype: bf16 moves half the
bytes of the fp32 master weights) and yields a bucket once it holds about `bucket_bytes`, so the peak is
about two buckets (the one being loaded, the one being gathered). `copy_full_weights` streams the same way
into an unsharded module (the RL trainer's KL reference). Names are mapped to the HF checkpoint
names that `from_pretrained` and vLLM's `load_weights` expect (`hf_name`): wrapper segments such as
`_checkpoint_wrapped_module.` (activation checkpointing), `_orig_mod.` (torch.compile) and
`_fsdp_wrapped_module.` are removed, and so is the `hf.` prefix of `PackedCausalLM`.

Verification (`Fingerprint`): after a sync the engine's copy must equal the trainer's. Comparing bytes
is not possible in general, because vLLM stores weights in its own layout: q/k/v and gate/up projections
fused into one tensor (`packed_modules_mapping`), vocabulary rows padded, and on CPU the linear weights
repacked into oneDNN/sgl kernels (the `weight` parameter is emptied). So a fingerprint is built from
quantities that are additive over concatenation and blind to repacking:
  - `value`:  (sum x, sum x^2) of the stored values, in float64;
  - `action`: (sum y, sum y^2) of y = X @ W^T for a fixed seeded probe X[4, K] (`probe_input`), for
    linear weights the engine holds only inside a kernel: the engine runs its own GEMM on X.
The trainer computes both for every 2-D weight it sends and folds q/k/v (gate/up) parts into the fused
name (`engine_name`), then `compare_fingerprints` checks them. Both are invariant to permutations of
the values (a transposed or shuffled layout passes): they catch wrong, stale, zeroed or corrupted tensors,
which is what goes wrong in practice, not a permuted one.

The engine side is `WeightSyncWorkerExtension`, mixed into vLLM's worker through
`LLM(worker_extension_cls=...)` and reached with `llm.collective_rpc("ceiling_fingerprints", ...)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from engine.errors import CeilingError
from engine.models.hf_checkpoint import hf_name

__all__ = [
    "Fingerprint",
    "WeightSyncError",
    "WeightSyncWorkerExtension",
    "compare_fingerprints",
    "copy_full_weights",
    "engine_name",
    "fingerprint_bucket",
    "iter_weight_buckets",
    "probe_input",
]

PROBE_ROWS = 4
PROBE_SEED = 20_251_211


class WeightSyncError(CeilingError):
    """The rollout engine does not hold the trainer's weights (checksum mismatch, stale version, stale cache)."""


def iter_weight_buckets(model: torch.nn.Module, bucket_bytes: int, dtype: torch.dtype | None = None,
                        ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Full parameters under HF names, `bucket_bytes` at a time (collective under FSDP2: all ranks iterate).

    Tied weights appear once (under the first name, e.g. `model.embed_tokens.weight`); tensors are detached,
    cast to `dtype` when given, and stay on the parameter's device. The cast comes before the gather: each
    rank casts its shard, so the all-gather moves `dtype` (bf16: half the bytes of the fp32 master weights)
    and the result is the same, a cast being elementwise.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for fqn, param in model.named_parameters():
        t = param.detach()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)  # a DTensor casts its local shard
        if isinstance(t, DTensor):
            t = t.full_tensor()
        bucket.append((hf_name(fqn), t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


@torch.no_grad()
def copy_full_weights(model: torch.nn.Module, into: torch.nn.Module, bucket_bytes: int) -> None:
    """Copy `model`'s full weights (FSDP2-sharded or not) into the unsharded HF module `into` (e.g. the KL
    reference), bucket by bucket, gathered in `into`'s dtype (collective: every rank calls it, and every rank
    ends with the whole copy). The peak is `into` plus about one bucket, where a full state dict
    (`get_model_state_dict(full_state_dict=True)`) would first hold a whole fp32 copy on every rank (and with
    `cpu_offload=True` gives the weights to rank 0 only). Parameters only: the buffers of the HF decoders
    (rotary frequencies) are derived from the config and not persistent.
    """
    params = dict(into.named_parameters())
    dtypes = {p.dtype for p in params.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    seen: set[str] = set()
    for bucket in iter_weight_buckets(model, bucket_bytes, dtype):
        for name, t in bucket:
            if name not in params:
                raise WeightSyncError(f"copying weights: {name} has no counterpart in the {type(into).__name__}")
            params[name].copy_(t)
            seen.add(name)
    if missing := sorted(set(params) - seen):
        raise WeightSyncError(f"copying weights: the model has no {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")


def engine_name(name: str, packed_modules: dict[str, list[str]]) -> str:
    """HF name -> the engine's fused name: `...self_attn.k_proj.weight` -> `...self_attn.qkv_proj.weight`."""
    module, _, leaf = name.rpartition(".")
    parent, _, child = module.rpartition(".")
    for fused, parts in packed_modules.items():
        if child in parts:
            return f"{parent}.{fused}.{leaf}" if parent else f"{fused}.{leaf}"
    return name


def probe_input(in_features: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed probe X[4, K] of `action` fingerprints (the same on the trainer and in the engine)."""
    gen = torch.Generator().manual_seed(PROBE_SEED + in_features)
    return torch.randn(PROBE_ROWS, in_features, generator=gen).to(device=device, dtype=dtype)


@dataclass
class Fingerprint:
    """(sum, sum of squares) in float64 of a tensor's values (`value`) or of its action on the probe (`action`)."""

    kind: str
    total: float
    squares: float

    def __add__(self, other: Fingerprint) -> Fingerprint:
        if other.kind != self.kind:
            raise ValueError(f"cannot add a {other.kind} fingerprint to a {self.kind} one")
        return Fingerprint(self.kind, self.total + other.total, self.squares + other.squares)

    @classmethod
    def of_values(cls, t: torch.Tensor) -> Fingerprint:
        return cls("value", *_moments(t).tolist())

    @classmethod
    def of_output(cls, y: torch.Tensor) -> Fingerprint:
        return cls("action", *_moments(y).tolist())

    def matches(self, other: Fingerprint, rtol: float) -> bool:
        scale = math.sqrt(abs(self.squares)) + abs(self.total)  # the l2 norm bounds every summand
        return (abs(self.total - other.total) <= rtol * scale + 1e-12
                and abs(self.squares - other.squares) <= rtol * abs(self.squares) + 1e-12)


def fingerprint_bucket(bucket: Iterable[tuple[str, torch.Tensor]], packed_modules: dict[str, list[str]],
                       into: dict[str, dict[str, Fingerprint]], only: set[str] | None = None,
                       tied: dict[str, str] | None = None) -> None:
    """Add the trainer-side fingerprints of `bucket` to `into[engine_name][kind]` (both kinds for 2-D weights).

    `only`: engine names to fingerprint (sampled mode); None fingerprints everything. `tied`: engine names
    that share another's parameter (a tied `lm_head.weight` -> `model.embed_tokens.weight`).
    """
    aliases: dict[str, list[str]] = {}
    for alias, shared in (tied or {}).items():
        aliases.setdefault(shared, []).append(alias)
    kinds, moments = [], []  # the sums stay on the device until one host read for the whole bucket
    for name, t in bucket:
        key = engine_name(name, packed_modules)
        targets = [k for k in (key, *aliases.get(key, [])) if only is None or k in only]
        if not targets:
            continue
        kinds.append((targets, "value"))
        moments.append(_moments(t))
        if t.dim() == 2:  # a linear weight W[N, K]: its action X @ W^T, computed in the engine's dtype
            kinds.append((targets, "action"))
            moments.append(_moments(probe_input(t.shape[1], t.dtype, t.device) @ t.T))
    values = torch.stack(moments).tolist() if moments else []
    for (targets, kind), (total, squares) in zip(kinds, values):
        fp = Fingerprint(kind, total, squares)
        for target in targets:
            slot = into.setdefault(target, {})
            slot[kind] = slot[kind] + fp if kind in slot else fp


def _moments(t: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares] of `t` in float64, on its device (`Fingerprint` without the host read)."""
    x = t.detach().double()
    return torch.stack([x.sum(), (x * x).sum()])


def compare_fingerprints(expected: dict[str, dict[str, Fingerprint]], actual: dict[str, tuple[str, float, float]],
                         rtol_value: float, rtol_action: float) -> list[str]:
    """Mismatches between the trainer's `expected` and the engine's `actual` fingerprints, as readable lines."""
    problems = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problems.append(f"{name}: sent by the trainer but not found in the engine")
            continue
        if name not in expected:
            problems.append(f"{name}: held by the engine but never sent by the trainer")
            continue
        kind, total, squares = actual[name]
        want = expected[name].get(kind)
        got = Fingerprint(kind, total, squares)
        if want is None:
            problems.append(f"{name}: engine reports a {kind} fingerprint the trainer did not compute")
        elif not want.matches(got, rtol_value if kind == "value" else rtol_action):
            problems.append(f"{name} ({kind}): trainer sum={want.total:.6g} sumsq={want.squares:.6g}, "
                            f"engine sum={got.total:.6g} sumsq={got.squares:.6g}")
    return problems


class WeightSyncWorkerExtension:
    """Methods added to vLLM's worker (`worker_extension_cls`); called through `LLM.collective_rpc`.

    Runs inside the worker, where `self.model_runner.get_model()` is the engine's model.
    """

    def _tied_heads(self) -> dict[str, tuple[torch.nn.Module, str]]:
        """LM heads that share the embedding's parameter: `lm_head.weight` -> (module, parameter name)."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        model = self.model_runner.get_model()
        by_id = {id(p): n for n, p in model.named_parameters()}
        return {f"{name}.weight": (module, by_id[id(module.weight)]) for name, module in model.named_modules()
                if isinstance(module, ParallelLMHead) and f"{name}.weight" not in by_id
                and id(module.weight) in by_id}

    def ceiling_engine_layout(self) -> dict[str, object]:
        """Parameter names, tied LM heads (name -> the parameter they share) and the fused-module map."""
        model = self.model_runner.get_model()
        tied = {name: shared for name, (_, shared) in self._tied_heads().items()}
        return {"names": [n for n, _ in model.named_parameters()] + list(tied), "tied": tied,
                "packed_modules": dict(getattr(model, "packed_modules_mapping", {}) or {})}

    @torch.inference_mode()
    def ceiling_refresh_tied_heads(self) -> int:
        """Re-derive the kernel state of tied LM heads after an in-place reload.

        vLLM's layerwise reload updates the shared embedding parameter in place but, the head receiving
        no weights of its own, keeps its post-load state; on CPU that is a oneDNN copy of the old
        embedding, so logits would come from the previous weights."""
        heads = self._tied_heads()
        for module, _ in heads.values():
            module.quant_method.process_weights_after_loading(module)
        return len(heads)

    @torch.inference_mode()
    def ceiling_fingerprints(self, names: list[str] | None = None) -> dict[str, tuple[str, float, float]]:
        """(kind, sum, sum of squares) of each named parameter as the engine holds it (see the module doc)."""
        from vllm.model_executor.layers.linear import LinearBase

        model = self.model_runner.get_model()
        modules = dict(model.named_modules())
        wanted = set(names) if names is not None else None
        out = {}
        for name, param in model.named_parameters():
            if wanted is not None and name not in wanted:
                continue
            module = modules[name.rpartition(".")[0]]
            if name.endswith(".weight") and isinstance(module, LinearBase):
                # A linear layer: fingerprint its action through the engine's own kernel (works for
                # weights repacked into CPU kernels as well as plain ones).
                x = probe_input(int(module.input_size), param.dtype, param.device)
                fp = Fingerprint.of_output(module.quant_method.apply(module, x))
            else:
                fp = Fingerprint.of_values(param)
            out[name] = (fp.kind, fp.total, fp.squares)
        for name, (module, _) in self._tied_heads().items():  # the head's logits kernel, not the shared values
            if wanted is None or name in wanted:
                x = probe_input(int(module.weight.shape[1]), module.weight.dtype, module.weight.device)
                fp = Fingerprint.of_output(module.quant_method.apply(module, x))
                out[name] = (fp.kind, fp.total, fp.squares)
        return out
