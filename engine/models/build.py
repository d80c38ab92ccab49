"""Build or load a causal LM, and wrap it so the LM head feeds the fused loss.

    hf = build_model(path=None, config="configs/models/tiny-qwen2.json", dtype=torch.float32, seed=0)
    model = PackedCausalLM(hf)
    loss = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)

`build_model` loads a local HF directory (weights and config; never downloads) or builds a model with
random weights from an HF `config.json` (seeded, so every rank builds the same one). With `meta=True` it
builds a local HF directory's architecture without memory; the trainers then shard it and each rank reads
only its shard (engine/models/hf_checkpoint.py), so no rank holds the full model. Attention runs
over packed sequences (engine/models/attention.py).

`PackedCausalLM.forward` runs the decoder to hidden states h_TH and hands them, with the LM-head
weight w_VH, to `loss_fn(h_TH, w_VH)` (engine.losses). The LM head is never applied to all tokens
at once. The loss is computed inside forward on purpose: under FSDP2 the root module all-gathers the
LM-head weight for its forward, so the weight the loss sees is the full tensor, and its gradient
flows back to the sharded parameter through autograd. Tied embeddings work the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from engine.errors import CeilingError
from engine.models.attention import PACKED_ATTENTION, needs_host_boundaries

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")


def load_model_config(path: str | Path):
    """Read an HF config.json (a file, or a directory holding one) into a transformers config."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CeilingError(f"{file}: model config not found")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CeilingError(f"{file}: not valid JSON: {exc}") from None
    model_type = data.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CeilingError(f"{file}: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    return AutoConfig.for_model(model_type, **data)


def build_model(
    *, path: str | Path | None = None, config: str | Path | None = None, dtype: torch.dtype = torch.float32,
    seed: int = 0, meta: bool = False,
) -> PreTrainedModel:
    """Load weights from a local HF dir (`path`), or build random weights from `config`.

    `meta=True` (with `path`) builds the architecture on the meta device and loads nothing: the caller shards
    it and fills the shards with `engine.models.hf_checkpoint.load_hf_sharded`.
    """
    if (path is None) == (config is None):
        raise CeilingError("model: set exactly one of model.path (a local HF directory) or model.config")
    if meta and path is None:
        raise CeilingError("build_model: meta=True needs a path to load the weights from")
    if path is not None:
        if not Path(path).is_dir():
            raise CeilingError(f"model.path: {path} is not a directory")
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_model_config(path), dtype=dtype,
                                                     attn_implementation=PACKED_ATTENTION)
    elif path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=PACKED_ATTENTION, local_files_only=True
        )
    else:
        hf_config = load_model_config(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=PACKED_ATTENTION)
    model.config.use_cache = False
    return model


class PackedCausalLM(nn.Module):
    """An HF causal LM whose forward ends in a fused LM-head loss instead of logits."""

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        self.hf = hf_model

    @property
    def decoder(self) -> nn.Module:
        return self.hf.get_decoder()

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def forward(
        self,
        input_ids_T: torch.Tensor,
        position_ids_T: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], object],
    ):
        extra = {}
        if needs_host_boundaries(input_ids_T.device):  # once per forward, not once per layer
            extra["seq_ends_host"] = cu_seqlens[1:].tolist()
        out = self.decoder(
            input_ids=input_ids_T[None],
            position_ids=position_ids_T[None],
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
            use_cache=False,
            **extra,
        )
        h_TH = out.last_hidden_state[0]
        return loss_fn(h_TH, self.hf.get_output_embeddings().weight)
