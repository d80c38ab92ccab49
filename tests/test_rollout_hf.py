"""HFRollout on a tiny random Qwen2 with the char tokenizer (CPU)."""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import Qwen2Config, Qwen2ForCausalLM

from engine.data.tokenizer import build_char_tokenizer, end_of_turn_id
from engine.models import build_model
from engine.models.attention import PACKED_ATTENTION
from engine.rollout.base import RolloutOutput, SamplingParams
from engine.rollout.hf import HFRollout


@pytest.fixture(autouse=True)
def torch_loss_path(monkeypatch):
    """The log-prob pass runs the fused loss: on its CPU torch path, as users get it (tests/conftest.py sets the
    Triton interpreter for the kernel tests)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=len(tok), initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = Qwen2ForCausalLM(cfg)
    return m.eval()


@pytest.fixture(scope="module")
def prompts(tok):
    msgs = ["What is 2+3?", "Hi", "Compute 12*7 step by step."]
    return [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True)["input_ids"]
            for m in msgs]


@pytest.fixture
def force_logit(model):
    """Context: add `value` to the logits of `token_ids` (a forward hook on the LM head module, so it steers
    `generate` only: the fused log-prob pass, like the trainer, reads the LM-head weight). Returns the handle."""
    handles = []

    def apply(token_ids, value):
        def hook(module, inputs, out):
            out = out.clone()
            out[..., token_ids] += value
            return out
        handles.append(model.lm_head.register_forward_hook(hook))
        return handles[-1]

    yield apply
    for h in handles:
        h.remove()


def teacher_forced_logp(model, prompt, tokens, temperature=1.0):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, -1)
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_shapes_and_length_finish(model, tok, prompts, force_logit):
    force_logit(HFRollout(model, tok).stop_ids, -1e4)  # never stop
    outs = HFRollout(model, tok, batch_size=4).generate(prompts, SamplingParams(max_new_tokens=6, n=3, seed=0))
    assert [len(o) for o in outs] == [3, 3, 3]
    for p, group in zip(prompts, outs):
        for o in group:
            assert isinstance(o, RolloutOutput) and o.prompt_ids == p
            assert len(o.token_ids) == 6 and len(o.logprobs) == 6
            assert o.finish_reason == "length" and o.stop_token_id is None
            assert o.text == tok.decode(o.token_ids, skip_special_tokens=True) and o.response_ids() == o.token_ids


def test_seed_determinism_and_global_rng(model, tok, prompts):
    r = HFRollout(model, tok, batch_size=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=123)
    state = torch.get_rng_state()
    a = r.generate(prompts[:2], params)
    assert torch.equal(state, torch.get_rng_state())  # seeded calls leave the global RNG alone
    b = r.generate(prompts[:2], params)
    c = r.generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=124))
    ids = lambda outs: [o.token_ids for g in outs for o in g]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_logprobs_off_skips_the_scoring_pass_and_samples_the_same(model, tok, prompts, monkeypatch):
    r = HFRollout(model, tok, batch_size=4)
    on = r.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=5))
    monkeypatch.setattr(r, "_score", lambda *a: pytest.fail("logprobs=False still ran the teacher-forced pass"))
    off = r.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=5, logprobs=False))
    assert [o.response_ids() for g in off for o in g] == [o.response_ids() for g in on for o in g]
    assert all(o.logprobs is None and o.stop_logprob is None and o.response_logprobs() is None for g in off for o in g)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(model, tok, prompts, temperature):
    outs = HFRollout(model, tok, batch_size=6).generate(
        prompts, SamplingParams(temperature=temperature, max_new_tokens=10, n=2, seed=7))
    for p, group in zip(prompts, outs):
        for o in group:
            toks, lps = o.response_ids(), o.response_logprobs()
            ref = teacher_forced_logp(model, p, toks, temperature)
            torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=0)


def test_greedy_batched_equals_one_by_one(model, tok, prompts):
    batched = HFRollout(model, tok, batch_size=6).generate(prompts, SamplingParams(temperature=0, max_new_tokens=8, n=2))
    single = HFRollout(model, tok, batch_size=1).generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))
    for p, gb, (os_,) in zip(prompts, batched, single):
        assert len(os_.token_ids) > 0
        ref = teacher_forced_logp(model, p, os_.response_ids(), 1.0)  # greedy: logprobs at T = 1
        torch.testing.assert_close(torch.tensor(os_.response_logprobs()), ref, atol=1e-4, rtol=0)
        for ob in gb:  # greedy: the n samples agree, and left padding changes nothing
            assert ob.token_ids == os_.token_ids and ob.finish_reason == os_.finish_reason
            torch.testing.assert_close(torch.tensor(ob.logprobs), torch.tensor(os_.logprobs), atol=1e-4, rtol=0)


def test_empty_inputs_and_immediate_stop(model, tok, prompts, force_logit):
    r = HFRollout(model, tok)
    assert r.generate([], SamplingParams(n=4)) == []
    eot = end_of_turn_id(tok)
    hook = force_logit([eot], 1e4)
    outs = r.generate(prompts[:2], SamplingParams(max_new_tokens=5, n=2, seed=0))
    hook.remove()
    for p, o in ((p, o) for p, g in zip(prompts, outs) for o in g):
        assert o.token_ids == [] and o.text == "" and o.logprobs == []
        assert o.finish_reason == "stop" and o.stop_token_id == eot and o.response_ids() == [eot]
        # the stop token's logprob is the model's (what the trainer recomputes), not the hooked logits' 0
        ref = teacher_forced_logp(model, p, [eot])
        assert o.response_logprobs() == [pytest.approx(float(ref[0]), abs=1e-4)]
        assert o.stop_logprob < -1
    with pytest.raises(ValueError, match="empty"):
        r.generate([[]], SamplingParams())


def test_top_p_truncates_sampling_and_packed_attention_restored(model, tok, prompts):
    model.config._attn_implementation = PACKED_ATTENTION  # as a training model built by engine.models
    model.config.use_cache = False
    model.train()
    try:
        r = HFRollout(model, tok, batch_size=6)
        ids = lambda outs: [o.token_ids for g in outs for o in g]
        greedy = ids(r.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8, n=2)))
        hot = SamplingParams(temperature=1.5, max_new_tokens=8, n=2, seed=0)
        assert ids(r.generate(prompts, hot)) != greedy  # at T = 1.5 without truncation, sampling is not greedy
        # a nucleus of probability 1e-6 holds only the most likely token: sampling at T = 1.5 becomes greedy
        nucleus = r.generate(prompts, SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=8, n=2, seed=0))
        assert ids(nucleus) == greedy
        assert model.config._attn_implementation == PACKED_ATTENTION
        assert model.config.use_cache is False and model.training
    finally:
        model.config._attn_implementation = "sdpa"
        model.config.use_cache = True
        model.eval()
    for p, o in ((p, o) for p, g in zip(prompts, nucleus) for o in g):  # logprobs: before truncation, at T
        ref = teacher_forced_logp(model, p, o.response_ids(), 1.5)
        torch.testing.assert_close(torch.tensor(o.response_logprobs()), ref, atol=1e-4, rtol=0)
        assert max(o.response_logprobs()) < -1e-3  # not the truncated distribution's log 1 = 0


def test_sampling_params_validation():
    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0), dict(n=0),
                dict(seed=-1)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(temperature=0).greedy
    with pytest.raises(ValueError):
        RolloutOutput([1], [2], "x", "eos")
    with pytest.raises(ValueError):
        RolloutOutput([1], [2], "x", "stop")  # stop without its token


def test_lifecycle_on_the_shared_model_only_bumps_the_version(model, tok, prompts):
    r = HFRollout(model, tok)
    before = {n: p.clone() for n, p in model.named_parameters()}
    r.sleep(), r.sync_weights(model, 1), r.wake()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    outs = r.generate(prompts[:1], SamplingParams(max_new_tokens=3, seed=0))
    assert outs[0][0].weight_version == 1


def test_checkpoint_generation_config_is_ignored(model, tok, prompts):
    saved = model.generation_config
    model.generation_config = saved.__class__(top_k=1, repetition_penalty=5.0, temperature=0.01)
    try:
        outs = HFRollout(model, tok).generate(prompts[:1], SamplingParams(max_new_tokens=6, n=4, seed=1))
        assert len({tuple(o.token_ids) for o in outs[0]}) > 1  # top_k=1 would make all four samples equal
        assert model.generation_config.top_k == 1  # restored
    finally:
        model.generation_config = saved


def cpu_peak_bytes(fn) -> int:
    """Peak bytes live in torch's CPU allocator while fn() runs, beyond what was live before: the running sum of
    the profiler's allocation / free records (profile_memory=True), in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_generation_memory_does_not_grow_with_vocab_times_new_tokens(tok, tmp_path):
    """The log-probs come from a teacher-forced pass through the fused LM head, so generation holds no [rows, V]
    fp32 logits per generated token (output_logits would: rows x V x 4 bytes x new tokens)."""
    rows, vocab, new = 8, 50_000, 64
    cfg = json.loads(open("configs/models/tiny-qwen2.json").read()) | {"vocab_size": vocab}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    big = build_model(config=tmp_path / "config.json", seed=0)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {i}+{i}?"}],
                                       add_generation_prompt=True)["input_ids"] for i in range(rows)]
    r = HFRollout(big, tok, batch_size=rows)
    outs = []
    peak = cpu_peak_bytes(lambda: outs.extend(r.generate(prompts, SamplingParams(max_new_tokens=new, seed=0))))
    assert max(len(g[0].token_ids) for g in outs) == new  # generation ran all the steps
    step_logits = rows * vocab * 4  # one decoding step's fp32 [rows, V] logits
    assert peak >= step_logits  # the measurement sees the generation's allocations
    assert peak < step_logits * new / 4, f"peak {peak / 2**20:.0f} MiB"  # the old output_logits path: > 3x this
