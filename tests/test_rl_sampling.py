"""DAPO dynamic sampling with fake generation rounds; the transformers rollout samples what the loss trains."""

import json
from functools import partial

import pytest
import torch

from engine.data.packing import collate_packed
from engine.data.tokenizer import build_char_tokenizer
from engine.losses import linear_policy_loss
from engine.models import PackedCausalLM, build_model
from engine.rl.sampling import Group, UnfilledBatchError, dynamic_sampling, is_informative
from engine.rollout.base import SamplingParams
from engine.rollout.hf import HFRollout


def fake_rounds(pattern):
    """generate_round returning, per round, groups with the given rewards (payload = (round, index))."""
    calls = []

    def generate_round(k):
        calls.append(k)
        return [Group(r, payload=(k, i)) for i, r in enumerate(pattern)]

    return generate_round, calls


# 4 groups per round: 2 informative, 1 all correct, 1 all wrong
ROUND = [[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]


def test_rounds_until_full():
    gen, calls = fake_rounds(ROUND)
    res = dynamic_sampling(gen, train_batch=5, max_gen_rounds=10)
    assert calls == [0, 1, 2] and res.num_rounds == 3  # 2 + 2 + 2 >= 5
    assert len(res.groups) == 5 and res.filled
    assert [g.payload for g in res.groups] == [(0, 0), (0, 3), (1, 0), (1, 3), (2, 0)]
    assert all(g.informative for g in res.groups)
    assert (res.num_generated, res.num_informative, res.num_all_correct, res.num_all_wrong) == (12, 6, 3, 3)
    assert res.kept_fraction == pytest.approx(0.5)
    assert res.round_sizes == [4, 4, 4]
    assert res.stats()["sampling/rounds"] == 3


def test_max_rounds_returns_partial():
    gen, calls = fake_rounds(ROUND)
    res = dynamic_sampling(gen, train_batch=5, max_gen_rounds=2)
    assert calls == [0, 1] and res.num_rounds == 2
    assert len(res.groups) == 4 and not res.filled


def test_nothing_informative():
    gen, _ = fake_rounds([[1, 1], [0, 0]])
    res = dynamic_sampling(gen, train_batch=1, max_gen_rounds=3)
    assert res.groups == [] and res.num_rounds == 3 and not res.filled and res.kept_fraction == 0


def test_exact_fill_in_one_round():
    gen, calls = fake_rounds(ROUND)
    res = dynamic_sampling(gen, train_batch=2, max_gen_rounds=1)
    assert calls == [0] and res.filled and len(res.groups) == 2


def test_no_filtering_is_one_round_keep_all():
    gen, calls = fake_rounds(ROUND)
    res = dynamic_sampling(gen, train_batch=4, max_gen_rounds=5, filter_groups=False)
    assert calls == [0] and res.num_rounds == 1 and len(res.groups) == 4 and res.filled
    assert res.kept_fraction == 0.5  # informative share, for logging


def test_group_and_validation():
    assert is_informative([0.0, 1.0]) and not is_informative([0.5, 0.5]) and not is_informative([])
    assert Group([1, 0]).mean_reward == 0.5
    with pytest.raises(ValueError):
        Group([])
    with pytest.raises(ValueError):
        dynamic_sampling(lambda k: [], train_batch=0, max_gen_rounds=1)
    with pytest.raises(ValueError):
        dynamic_sampling(lambda k: [], train_batch=1, max_gen_rounds=0)


def test_unfilled_batch_error_or_short():
    """RETU stops with an error when max_num_gen_batches rounds do not fill the batch; train-short returns it."""
    gen, calls = fake_rounds(ROUND)
    with pytest.raises(UnfilledBatchError, match=r"kept 4 of 5 groups after 2 rounds"):
        dynamic_sampling(gen, train_batch=5, max_gen_rounds=2, on_unfilled="error")
    gen, calls = fake_rounds(ROUND)
    res = dynamic_sampling(gen, train_batch=5, max_gen_rounds=2, on_unfilled="train-short")
    assert not res.filled and len(res.groups) == 4 and res.stats()["sampling/filled"] == 0.0
    gen, _ = fake_rounds(ROUND)
    assert dynamic_sampling(gen, train_batch=4, max_gen_rounds=2, on_unfilled="error").filled
    with pytest.raises(ValueError, match="on_unfilled"):
        dynamic_sampling(gen, train_batch=1, max_gen_rounds=1, on_unfilled="skip")


# ----------------------------------------------------------------------------------------- rollout sampling


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Qwen2 (packed attention) with the char tokenizer, and chat prompts."""
    tok = build_char_tokenizer()
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                    max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.2)))
    model = build_model(config=path, seed=3)
    prompts = [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True)["input_ids"]
               for m in ("What is 2+3?", "Compute 12*7.")]
    return model, tok, prompts


@pytest.fixture
def torch_loss_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def trainer_logp(model, seqs, temperature):
    """The trainer's per-token logp of (prompt, response) pairs: packed forward + fused LM-head pass at T."""
    ids = [p + r for p, r in seqs]
    masks = [[0] * len(p) + [1] * len(r) for p, r in seqs]
    batch = collate_packed(ids, masks, list(range(len(seqs))))
    mask = (batch.labels != -100).float()
    fn = partial(linear_policy_loss, targets=batch.labels.clamp(min=0), advantages=torch.zeros_like(mask),
                 loss_mask=mask, temperature=temperature)
    with torch.no_grad():
        out = PackedCausalLM(model)(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, fn)
    return [out.logp[s:e][mask[s:e] != 0] for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())]


@pytest.mark.usefixtures("torch_loss_path")
def test_rollout_logprobs_equal_trainer_logp_at_temperature(tiny):
    """At T = 0.7 the log-probs the rollout reports for its samples equal the trainer's logp of the same tokens
    (logits / T in the fused loss): the update optimises the policy that sampled (RETU, map §8)."""
    model, tok, prompts = tiny
    outs = HFRollout(model, tok).generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=12, n=3, seed=5))
    flat = [o for per_prompt in outs for o in per_prompt]
    seqs = [(o.prompt_ids, o.response_ids()) for o in flat]
    rollout = [torch.tensor(o.response_logprobs()) for o in flat]
    assert all(len(r) > 0 for r in rollout)
    for got, want in zip(trainer_logp(model, seqs, 0.7), rollout):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the loss at T = 1 is another distribution (so the comparison above can fail)
    assert max(float((a - b).abs().max()) for a, b in zip(trainer_logp(model, seqs, 1.0), rollout)) > 0.05


def test_rollout_samples_the_full_distribution_at_top_p_1(tiny):
    """top_p = 1 samples from every token: no implicit top-k (transformers' GenerationConfig defaults to
    top_k=50, and a checkpoint's generation_config.json may set one, e.g. Qwen's 20)."""
    model, tok, prompts = tiny
    vocab = len(tok)
    assert vocab > 60
    # logits 0 .. 0.5 over the vocabulary: all distinct (a top-k cut has a k-th value to cut at), and close
    # to uniform (probabilities within a factor e^0.5)
    ramp = torch.linspace(0.0, 0.5, vocab)
    hook = model.lm_head.register_forward_hook(lambda module, inputs, out: torch.zeros_like(out) + ramp)
    model.generation_config.top_k = 20  # as a checkpoint might ship it; the rollout must ignore it
    try:
        outs = HFRollout(model, tok, batch_size=256).generate(
            prompts[:1], SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=1, n=512, seed=0))[0]
    finally:
        hook.remove()
    first = {o.token_ids[0] if o.token_ids else o.stop_token_id for o in outs}
    # near-uniform over ~100 tokens, 512 draws: ~98 distinct expected; a top-k of 50 (or 20) would cap it there
    assert len(first) > 60
