"""Packed attention: equal to running each sequence alone, and no token attends across a boundary."""

import json

import pytest
import torch

from engine.models import PackedCausalLM, build_model
from engine.models.attention import set_attention_backend

TINY = {
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=256,
                  tie_word_embeddings=True),
    "llama": dict(model_type="llama", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=3, vocab_size=89, max_position_embeddings=256,
                  tie_word_embeddings=False),
}


def tiny_model(tmp_path, kind):
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(TINY[kind]))
    return build_model(config=path, seed=0)


def packed(seqs):
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    return ids, pos, cu, max(len(s) for s in seqs)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_packed_equals_per_sequence(tmp_path, kind):
    hf = tiny_model(tmp_path, kind)
    model = PackedCausalLM(hf)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, hf.config.vocab_size, (n,), generator=gen) for n in (7, 1, 13, 4)]
    logits = model(*packed(seqs), lambda h, w: h @ w.T)
    hf.config._attn_implementation = "sdpa"
    reference = torch.cat([hf(s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_no_attention_across_boundaries(tmp_path):
    hf = tiny_model(tmp_path, "qwen2")
    model = PackedCausalLM(hf)
    a, b = torch.randint(0, 101, (9,)), torch.randint(0, 101, (6,))
    out1 = model(*packed([a, b]), lambda h, w: h)
    a2 = a.clone()
    a2[:] = (a2 + 1) % 101  # change every token of the first sequence
    out2 = model(*packed([a2, b]), lambda h, w: h)
    torch.testing.assert_close(out1[9:], out2[9:])  # the second sequence does not see the first
    assert not torch.allclose(out1[:9], out2[:9])
    # gradient check: the loss on sequence 2 gives no gradient to sequence 1's embeddings
    emb = hf.get_input_embeddings()
    captured = {}
    handle = emb.register_forward_hook(lambda m, i, o: captured.setdefault("x", o.retain_grad() or o))
    out = model(*packed([a, b]), lambda h, w: h)
    out[9:].sum().backward()
    handle.remove()
    grad = captured["x"].grad[0]
    assert grad[:9].abs().max() == 0 and grad[9:].abs().max() > 0


def test_backend_validation():
    with pytest.raises(ValueError, match="not one of"):
        set_attention_backend("xformers")


def test_build_model_errors(tmp_path):
    from engine.errors import CeilingError

    with pytest.raises(CeilingError, match="exactly one"):
        build_model()
    with pytest.raises(CeilingError, match="model config not found"):
        build_model(config=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CeilingError, match="model_type 'gpt2' is not one of"):
        build_model(config=bad)
