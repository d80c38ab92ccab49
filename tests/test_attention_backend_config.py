"""model.attention lists every backend engine/models/attention.py implements; npu_fusion needs torch_npu when the
model is built (configs stay loadable anywhere)."""

import importlib.util
import typing
from pathlib import Path

import pytest

from engine.config import ModelConfig, SFTJobConfig, load_config
from engine.errors import CeilingError, ConfigError
from engine.models import attention
from engine.training import build_policy

HAS_TORCH_NPU = importlib.util.find_spec("torch_npu") is not None
TINY = [f"model.config={Path(__file__).resolve().parents[1] / 'configs/models/tiny-qwen2.json'}", "model.tokenizer=char"]


def test_config_lists_every_backend():
    assert typing.get_args(typing.get_type_hints(ModelConfig)["attention"]) == attention.BACKENDS
    job = load_config(None, SFTJobConfig, [*TINY, "model.attention=npu_fusion"])
    assert job.model.attention == "npu_fusion"
    with pytest.raises(ConfigError, match=r"model.attention: 'npu' is not one of"):
        load_config(None, SFTJobConfig, [*TINY, "model.attention=npu"])


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed: the missing-package error cannot occur")
def test_npu_fusion_without_torch_npu_fails_at_model_build():
    from engine.distributed import init_distributed

    job = load_config(None, SFTJobConfig, [*TINY, "model.attention=npu_fusion", "run.device=cpu"])
    before = attention._backend
    with pytest.raises(CeilingError, match=r"model.attention='npu_fusion' needs torch_npu"):
        build_policy(job.model, 0, init_distributed("cpu"), job.fsdp, job.kernels)
    assert attention._backend == before  # the process keeps the backend it had
