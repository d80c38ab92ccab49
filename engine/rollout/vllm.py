"""Colocated vLLM rollout: a skeleton written against vLLM's public `LLM` API, NOT tested here.

vLLM is not installed on the development machines, so nothing in this file has ever run; it is kept small
so that wiring it up on a GPU machine with vLLM is a short, reviewable change. Every method raises
`RuntimeError("vLLM is not installed")` when `import vllm` fails, and the module itself imports without vLLM.

Intended use (one engine per training process, colocated on the same GPU):

    rollout = VLLMRollout(model_dir, gpu_memory_utilization=0.5)     # enable_sleep_mode=True
    outs = rollout.generate(prompt_ids, params)  # LLM.generate on TokensPrompt, SamplingParams(logprobs=0)
    rollout.sleep()                              # LLM.sleep(level=1): offload weights, drop the KV cache
    ... training update ...
    rollout.sync_weights(model)                  # wake weights only, load_weights in buckets, reset prefix cache
    rollout.wake()                               # LLM.wake_up(): reallocate the KV cache

Open points to verify on a vLLM machine: (1) the logprob definition - vLLM returns raw-logit logprobs
unless `logprobs_mode` is set; our `RolloutOutput.logprobs` contract is log_softmax(logits / T) before
top-p (`engine.rollout.base`); (2) `LLM.apply_model` for weight loading needs
`VLLM_ALLOW_INSECURE_SERIALIZATION=1` under the V1 multiprocess engine; (3) FSDP2 DTensor parameters are
gathered with `full_tensor()` bucket by bucket, which every rank must call together.
"""

from __future__ import annotations

from typing import Any

from engine.rollout.base import Rollout, RolloutOutput, SamplingParams

__all__ = ["VLLMRollout", "vllm_available"]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _require_vllm() -> None:
    if not vllm_available():
        raise RuntimeError("vLLM is not installed (pip install 'ceiling-engine[gpu]'); use HFRollout instead")


class VLLMRollout(Rollout):
    """vLLM engine colocated with training (untested skeleton; see the module docstring)."""

    def __init__(self, model_dir: str, *, stop_token_ids: list[int] | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, dtype: str = "bfloat16", seed: int = 0,
                 logprobs_mode: str = "processed_logprobs", bucket_bytes: int = 1 << 30):
        _require_vllm()
        from vllm import LLM

        self.stop_token_ids = list(stop_token_ids or [])
        self.bucket_bytes = bucket_bytes
        self._llm = LLM(model=model_dir, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                        gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True,
                        enable_prefix_caching=True, logprobs_mode=logprobs_mode)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[RolloutOutput]]:
        _require_vllm()
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompt_ids:
            return []
        sp = VllmSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                max_tokens=params.max_new_tokens, seed=params.seed, logprobs=0,
                                stop_token_ids=self.stop_token_ids, skip_special_tokens=True)
        requests = self._llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], sp,
                                      use_tqdm=False)
        return [[self._output(list(p), c) for c in req.outputs] for p, req in zip(prompt_ids, requests)]

    def _output(self, prompt: list[int], c) -> RolloutOutput:
        ids = list(c.token_ids)
        lps = [step[tok].logprob for tok, step in zip(ids, c.logprobs)] if c.logprobs is not None else None
        stop_id = stop_lp = None
        reason = "stop" if c.finish_reason == "stop" else "length"
        if reason == "stop" and ids and ids[-1] in self.stop_token_ids:  # vLLM keeps the stop token in token_ids
            stop_id = ids.pop()
            stop_lp = lps.pop() if lps is not None else None
        elif reason == "stop":
            reason = "length"  # stopped on something we cannot represent; treat the turn as unfinished
        return RolloutOutput(prompt_ids=prompt, token_ids=ids, text=c.text, finish_reason=reason, logprobs=lps,
                             stop_token_id=stop_id, stop_logprob=stop_lp)

    def sync_weights(self, state_dict_or_model: Any) -> None:
        """Load the policy's weights into vLLM in buckets of ~bucket_bytes, then drop stale prefix-cache entries."""
        _require_vllm()
        sd = state_dict_or_model.state_dict() if hasattr(state_dict_or_model, "state_dict") else state_dict_or_model
        self._llm.wake_up(tags=["weights"])
        bucket, size = [], 0
        for name, t in sd.items():
            t = t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 DTensor -> full tensor
            bucket.append((name.removeprefix("hf."), t.detach()))
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                self._load(bucket)
                bucket, size = [], 0
        if bucket:
            self._load(bucket)
        self._llm.reset_prefix_cache()

    def _load(self, bucket: list) -> None:
        self._llm.apply_model(lambda model: model.load_weights(bucket))

    def sleep(self) -> None:
        _require_vllm()
        self._llm.sleep(level=1)

    def wake(self) -> None:
        _require_vllm()
        self._llm.wake_up()
