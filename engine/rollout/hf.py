"""Rollout through transformers `generate`: the backend for CPU, tests and machines without vLLM.

    rollout = HFRollout(model, tokenizer, batch_size=16)
    outs = rollout.generate(prompt_ids, SamplingParams(temperature=1.0, top_p=1.0, n=8, max_new_tokens=512))

How: the n copies of every prompt are generated in rows of `batch_size` with a KV cache, left padding
(so every row's next token sits in the last column), `do_sample=True` with temperature / top_p (top_k, repetition
penalty and every other logits processor off, whatever the checkpoint's generation_config.json says), or greedy at
temperature 0. Generation stops at the end-of-turn token (`<|im_end|>` / `<|eot_id|>`) and the tokenizer's eos.

Logprobs: `generate` keeps no logits (`output_logits` would hold an fp32 [rows, V] copy per generated token:
39 MB per token at 64 rows and V = 152064). After it returns, one teacher-forced pass scores what was sampled,
the way the trainer does (`RLTrainer._logprobs`): prompt + generated tokens (up to and including the stop token)
packed without padding (positions 0..len-1 per sequence, as `generate` derives them from the left-padded
attention mask), through the decoder with the packed attention (`engine.models.build.PackedCausalLM`), then
the fused LM-head loss (`engine.losses.linear_policy_loss`) at the sampling temperature (T = 1 for greedy) on
the hidden states of the generated positions only, `logprob_chunk_rows` (default `batch_size`) at a time, so
it holds no more fp32 logits than one decoding step of a full batch does ([rows, V]), not rows x V x new
tokens. The pass runs over at most `logprob_tokens` tokens at a time (a longer sequence alone), bounding the
decoder's activations. See `engine.rollout.base` for the exact definition of the logprobs. With
`SamplingParams(logprobs=False)` the pass is skipped (the RL trainer recomputes what it needs: a third of the
tiny model's rollout time, benchmarks/RESULTS.md).

Seeding: `params.seed` seeds a forked RNG for the call (the global RNG is left untouched), so the same
prompts, params and batch_size give the same samples. Without a seed the global RNG is used.

Weights: the rollout model is a separate copy (as a vLLM engine's would be); `sync_weights(policy, version)`
streams the policy's full weights into it through the same bucket iterator the vLLM backend uses
(`engine.rollout.weight_sync.iter_weight_buckets`), checks that every parameter arrived and that the loaded
values match the sent ones (fingerprints), and stamps `version` on later outputs.

Attention: the training model may use a packed-sequence attention ("ceiling_packed", which needs
cu_seqlens that `generate` does not pass); `generation_mode(model)` switches the config to "sdpa", eval mode
`use_cache=True` and a blank generation_config for the call and restores them afterwards. The model may be an HF
`PreTrainedModel` or an `engine.models.build.PackedCausalLM` wrapper (its `.hf` is used).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from engine.data.packing import collate_packed
from engine.data.tokenizer import stop_token_ids
from engine.losses import linear_policy_loss
from engine.models.attention import PACKED_ATTENTION
from engine.models.build import PackedCausalLM
from engine.rollout.base import Rollout, RolloutOutput, SamplingParams
from engine.rollout.weight_sync import (
    Fingerprint,
    WeightSyncError,
    compare_fingerprints,
    fingerprint_bucket,
    iter_weight_buckets,
)

__all__ = ["HFRollout", "generation_mode"]


@contextlib.contextmanager
def generation_mode(model: PreTrainedModel, attn_implementation: str = "sdpa") -> Iterator[PreTrainedModel]:
    """Temporarily: eval mode, `use_cache=True`, an attention implementation `generate` can drive, and a
    blank `generation_config` (a checkpoint's generation_config.json, e.g. Qwen's top_k=20 and
    repetition_penalty=1.05, would otherwise fill every sampling field the call leaves unset)."""
    config = model.config
    old_attn, old_cache, was_training = config._attn_implementation, config.use_cache, model.training
    old_gen = model.generation_config
    try:
        config._attn_implementation = attn_implementation  # the setter recurses into sub-configs
        config.use_cache = True
        model.generation_config = GenerationConfig()
        model.eval()
        yield model
    finally:
        config._attn_implementation = old_attn
        config.use_cache = old_cache
        model.generation_config = old_gen
        model.train(was_training)


def _response_logp(h_TH, w_VH, *, pos_N, targets_N, temperature, chunk_size) -> torch.Tensor:
    """Fused LM head on the rows `pos_N` of h_TH only: log softmax(h @ w.T / temperature)[target], fp32 [N]."""
    ones_N = torch.ones(len(pos_N), device=h_TH.device)
    return linear_policy_loss(h_TH.index_select(0, pos_N), w_VH, targets_N, advantages=torch.zeros_like(ones_N),
                              loss_mask=ones_N, temperature=temperature, chunk_size=chunk_size).logp


class HFRollout(Rollout):
    """`Rollout` over an in-memory transformers model: a copy of the policy (weights arrive by `sync_weights`),
    or the policy itself (then a sync only stamps the version)."""

    backend = "hf"

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, device: torch.device | str | None = None,
                 batch_size: int = 16, bucket_bytes: int = 512 << 20, checksum: bool = True,
                 logprob_tokens: int = 16384, logprob_chunk_rows: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if logprob_tokens < 1 or (logprob_chunk_rows is not None and logprob_chunk_rows < 1):
            raise ValueError(f"logprob_tokens and logprob_chunk_rows must be >= 1, got {logprob_tokens} and "
                             f"{logprob_chunk_rows}")
        self.logprob_tokens = logprob_tokens
        self.logprob_chunk_rows = logprob_chunk_rows or batch_size
        self.bucket_bytes, self.checksum = bucket_bytes, checksum
        self.model: PreTrainedModel = getattr(model, "hf", model)
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.batch_size = batch_size
        stops = stop_token_ids(tokenizer)
        self.stop_ids = stops
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else stops[0]

    def share(self, policy: torch.nn.Module) -> None:
        """Generate with `policy` itself from now on (a plain module on this device: one rank, no FSDP, so its
        parameters are the full weights), dropping the copy: no second model in memory, and a weight sync
        only stamps the version."""
        module = getattr(policy, "hf", policy)
        if any(hasattr(p, "device_mesh") for p in module.parameters()):
            raise ValueError("HFRollout.share needs an unsharded policy (FSDP2 parameters are shards)")
        self.model = module
        self.device = next(module.parameters()).device

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Collective: copy `model`'s weights (FSDP2-sharded or not) into the rollout model, bucket by bucket.

        A no-op apart from the version when the rollout generates with `model` itself."""
        self._check_newer(version)
        if getattr(model, "hf", model) is not self.model:
            self._load(model)
        self.weight_version = version

    @torch.no_grad()
    def _load(self, model: torch.nn.Module) -> None:
        params = dict(self.model.named_parameters())
        dtype = next(iter(params.values())).dtype
        sent: dict[str, dict[str, Fingerprint]] = {}
        for bucket in iter_weight_buckets(model, self.bucket_bytes, dtype):
            for name, t in bucket:
                if name not in params:
                    raise WeightSyncError(f"weight sync: the policy's {name} has no counterpart in the rollout model")
                params[name].copy_(t)
            if self.checksum:
                fingerprint_bucket(bucket, {}, sent)
        if self.checksum:
            held = {n: ("value", fp.total, fp.squares)
                    for n, fp in ((n, Fingerprint.of_values(p)) for n, p in params.items())}
            problems = compare_fingerprints(sent, held, rtol_value=1e-9, rtol_action=0.0)
            if problems:
                raise WeightSyncError("weight sync: the rollout model does not hold the policy's weights:\n  "
                                      + "\n  ".join(problems[:20]))

    def close(self) -> None:
        """No-op: the rollout model is an ordinary module, freed with the rollout."""

    def sleep(self) -> None:
        """No-op: nothing is held beyond the training model (the KV cache lives only inside a call)."""

    def wake(self) -> None:
        """No-op, see `sleep`."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[RolloutOutput]]:
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        rows = [list(p) for p in prompt_ids for _ in range(params.n)]
        flat: list[RolloutOutput] = []
        rng = contextlib.nullcontext()
        if params.seed is not None:
            devices = [self.device] if self.device.type == "cuda" else []
            rng = torch.random.fork_rng(devices=devices, device_type=self.device.type)
        with rng, generation_mode(self.model), torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(rows), self.batch_size):
                flat.extend(self._generate_rows(rows[start:start + self.batch_size], params))
        return [flat[i * params.n:(i + 1) * params.n] for i in range(len(prompt_ids))]

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        sample = not params.greedy
        return GenerationConfig(
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample and params.top_p < 1 else None,
            top_k=0,  # 0 disables top-k; None would fall back to GenerationConfig's default of 50
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            return_dict_in_generate=False,  # the sequences only: no logits, and the KV cache is freed on return
        )

    def _generate_rows(self, rows: list[list[int]], params: SamplingParams) -> list[RolloutOutput]:
        width = max(len(r) for r in rows)
        ids_BL = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn_BL = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):  # left padding
            ids_BL[b, width - len(r):] = torch.tensor(r)
            attn_BL[b, width - len(r):] = 1
        seqs_BL = self.model.generate(input_ids=ids_BL.to(self.device), attention_mask=attn_BL.to(self.device),
                                      generation_config=self._generation_config(params))
        new_BN = seqs_BL[:, width:].cpu()
        del seqs_BL
        stop = torch.tensor(self.stop_ids)
        responses, ends = [], []  # response: generated tokens up to and including the first stop token
        for toks in new_BN:
            hits = torch.isin(toks, stop).nonzero()
            end = int(hits[0]) if len(hits) else None
            ends.append(end)
            responses.append(toks[:end + 1 if end is not None else len(toks)].tolist())
        temp = params.temperature if not params.greedy else 1.0
        logps = self._score(rows, responses, temp) if params.logprobs else [None] * len(rows)
        results = []
        for r, resp, lps, end in zip(rows, responses, logps, ends):
            toks = torch.tensor(resp, dtype=torch.long)
            if end is not None:
                results.append(self._output(r, toks[:end], None if lps is None else lps[:end], "stop", resp[end],
                                            None if lps is None else float(lps[end])))
            else:
                results.append(self._output(r, toks, lps, "length", None, None))
        return results

    @torch.no_grad()
    def _score(self, prompts: list[list[int]], responses: list[list[int]], temperature: float) -> list[torch.Tensor]:
        """log softmax(logits / temperature)[token] of every response token given its prompt: a teacher-forced
        pass, packed (the trainer's attention and positions), fused LM head on the response positions only."""
        out: list[torch.Tensor] = [torch.zeros(0)] * len(prompts)
        groups, group, tokens = [], [], 0
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if not r:
                continue
            n = len(p) + len(r)
            if group and tokens + n > self.logprob_tokens:
                groups.append(group)
                group, tokens = [], 0
            group.append(i)
            tokens += n
        if group:
            groups.append(group)
        packed = PackedCausalLM(self.model)
        with generation_mode(self.model, PACKED_ATTENTION):
            for group in groups:
                batch = collate_packed([prompts[i] + responses[i] for i in group],
                                       [[0] * len(prompts[i]) + [1] * len(responses[i]) for i in group], group)
                bounds = batch.cu_seqlens.tolist()
                # hidden state t predicts token t + 1: a response is predicted from positions
                # [start + len(prompt) - 1, end - 1) of its packed sequence; only those reach the LM head
                pos = torch.cat([torch.arange(bounds[j] + len(prompts[i]) - 1, bounds[j + 1] - 1)
                                 for j, i in enumerate(group)]).to(self.device)
                batch = batch.to(self.device)
                lm_head = partial(_response_logp, pos_N=pos, targets_N=batch.labels.index_select(0, pos),
                                  temperature=temperature, chunk_size=self.logprob_chunk_rows)
                logp_N = packed(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, lm_head).cpu()
                k = 0
                for i in group:
                    out[i] = logp_N[k:k + len(responses[i])]
                    k += len(responses[i])
        return out

    def _output(self, prompt, toks, lps, reason, stop_id, stop_lp) -> RolloutOutput:
        token_ids = toks.tolist()
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True) if token_ids else ""
        return RolloutOutput(prompt_ids=list(prompt), token_ids=token_ids, text=text, finish_reason=reason,
                             logprobs=None if lps is None else lps.tolist(), stop_token_id=stop_id,
                             stop_logprob=stop_lp,
                             weight_version=self.weight_version)
