"""Weight sync without vLLM: bucketed gathering from FSDP2, HF names, fingerprints, the HF backend's sync,
the version guard, the rollout config, and the vLLM version range."""

import pytest
import torch

from engine.config import load_config
from engine.data.tokenizer import build_char_tokenizer
from engine.errors import ConfigError
from engine.models import PackedCausalLM, build_model
from engine.rollout import RolloutConfig, SamplingParams, WeightSyncError, check_weight_version
from engine.rollout.base import sample_seed
from engine.rollout.hf import HFRollout
from engine.rollout.weight_sync import (
    Fingerprint,
    compare_fingerprints,
    engine_name,
    fingerprint_bucket,
    hf_name,
    iter_weight_buckets,
    probe_input,
)

TINY = "configs/models/tiny-qwen2.json"
QWEN_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.fixture
def fsdp_policy(trainer_env):
    """The trainer's policy: FSDP2 on a one-rank gloo group, activation checkpointing on (wrapper names)."""
    from engine.distributed import apply_fsdp, init_distributed

    info = init_distributed("cpu")
    policy = PackedCausalLM(build_model(config=TINY, dtype=torch.float32, seed=1))
    apply_fsdp(policy, policy.layers, param_dtype=torch.float32, device=info.device, activation_checkpointing=True)
    with torch.no_grad():  # move it away from every seed-0 copy
        for p in policy.parameters():
            p.add_(0.01)
    return policy


def test_hf_name_strips_wrappers():
    assert hf_name("hf.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert hf_name("_orig_mod.hf.model.layers.3._fsdp_wrapped_module.self_attn.q_proj.bias") == \
        "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("model.norm.weight") == "model.norm.weight"
    assert engine_name("model.layers.0.self_attn.k_proj.weight", QWEN_PACKED) == "model.layers.0.self_attn.qkv_proj.weight"
    assert engine_name("model.layers.0.mlp.down_proj.weight", QWEN_PACKED) == "model.layers.0.mlp.down_proj.weight"


def test_buckets_cover_every_weight_once_under_hf_names(fsdp_policy):
    reference = build_model(config=TINY, dtype=torch.float32, seed=1)
    names = [n for n, _ in reference.named_parameters()]
    budget = 64 << 10
    buckets = list(iter_weight_buckets(fsdp_policy, budget, dtype=torch.float16))
    got = [n for b in buckets for n, _ in b]
    assert got == names  # HF order and names; the tied lm_head appears once, as the embedding
    for b in buckets[:-1]:  # a bucket closes as soon as it reaches the budget
        sizes = [t.numel() * t.element_size() for _, t in b]
        assert sum(sizes) >= budget and sum(sizes[:-1]) < budget
    for _, t in (x for b in buckets for x in b):
        assert t.dtype == torch.float16 and not isinstance(t, torch.distributed.tensor.DTensor)
    with pytest.raises(ValueError):
        next(iter_weight_buckets(fsdp_policy, 0))


def test_fingerprints_fold_fused_layouts_and_catch_corruption():
    torch.manual_seed(0)
    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)
    sent: dict = {}
    fingerprint_bucket([("l.self_attn.q_proj.weight", q), ("l.self_attn.k_proj.weight", k)], QWEN_PACKED, sent)
    fingerprint_bucket([("l.self_attn.v_proj.weight", v)], QWEN_PACKED, sent)  # parts may span buckets
    fused = torch.cat([q, k, v])
    held_values = Fingerprint.of_values(fused.T.contiguous())  # a transposed layout holds the same values
    held_action = Fingerprint.of_output(probe_input(6, torch.float32) @ fused.T)
    for held in (held_values, held_action):
        actual = {"l.self_attn.qkv_proj.weight": (held.kind, held.total, held.squares)}
        assert compare_fingerprints(sent, actual, rtol_value=1e-9, rtol_action=1e-5) == []
    bad = fused.clone()
    bad[3, 2] += 1e-2  # one element off
    for held in (Fingerprint.of_values(bad), Fingerprint.of_output(probe_input(6, torch.float32) @ bad.T)):
        actual = {"l.self_attn.qkv_proj.weight": (held.kind, held.total, held.squares)}
        assert compare_fingerprints(sent, actual, rtol_value=1e-9, rtol_action=1e-5)
    missing = compare_fingerprints(sent, {}, 1e-9, 1e-5)
    assert missing and "not found in the engine" in missing[0]


def test_hf_rollout_syncs_from_fsdp_and_guards_versions(fsdp_policy):
    tok = build_char_tokenizer()
    rollout = HFRollout(build_model(config=TINY, dtype=torch.float32, seed=0), tok, "cpu", bucket_bytes=32 << 10)
    rollout.sync_weights(fsdp_policy, 1)
    policy = {n: p.full_tensor() for n, p in fsdp_policy.named_parameters()}
    for name, p in rollout.model.named_parameters():
        assert torch.equal(p, policy[[k for k in policy if hf_name(k) == name][0]])
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True)["input_ids"]
    outs = rollout.generate([prompt], SamplingParams(max_new_tokens=4, n=2, seed=0))
    check_weight_version(outs, 1)
    with pytest.raises(WeightSyncError, match="version"):
        check_weight_version(outs, 2)
    for stale in (1, 0):
        with pytest.raises(WeightSyncError, match="refusing weight version"):
            rollout.sync_weights(fsdp_policy, stale)


def test_sample_seeds_are_distinct_and_stable():
    seeds = {sample_seed(7, i, j) for i in range(50) for j in range(16)}
    assert len(seeds) == 800 and all(0 <= s < 2 ** 63 for s in seeds)
    assert sample_seed(7, 3, 2) == sample_seed(7, 3, 2) != sample_seed(8, 3, 2)


def test_rollout_config_section():
    from engine.rl.config import RLJobConfig

    job = load_config("configs/rl-tiny.yaml", RLJobConfig, ["rollout.backend=vllm", "rollout.bucket_mib=64"])
    assert job.rollout.backend == "vllm" and job.rollout.bucket_bytes == 64 << 20
    assert load_config("configs/rl-tiny.yaml", RLJobConfig).rollout.backend == "hf"
    with pytest.raises(ConfigError, match="rollout.backend"):
        load_config("configs/rl-tiny.yaml", RLJobConfig, ["rollout.backend=sglang"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("configs/rl-tiny.yaml", RLJobConfig, ["rollout.gpu_mem=0.3"])
    for bad in [dict(tensor_parallel_size=0), dict(gpu_memory_utilization=1.5), dict(bucket_mib=0),
                dict(kv_cache_memory_bytes=10), dict(backend="hf", tensor_parallel_size=2)]:
        with pytest.raises(ValueError):
            RolloutConfig(**bad)


def test_vllm_version_range_is_enforced(monkeypatch):
    vllm = pytest.importorskip("vllm")
    from engine.rollout.vllm import require_vllm

    assert require_vllm() == vllm.__version__
    monkeypatch.setattr(vllm, "__version__", "0.10.2")
    with pytest.raises(RuntimeError, match=r"vLLM 0\.10\.2 is not supported"):
        require_vllm()
