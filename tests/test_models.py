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


# ---------------------------------------------------------------- meta init, sharded HF load and export


def _save_tiny(tmp_path, kind):
    hf = tiny_model(tmp_path, kind)
    out = tmp_path / f"{kind}-hf"
    hf.save_pretrained(out)
    return hf, out


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_meta_build_and_sharded_load_without_fsdp(tmp_path, kind):
    from engine.models.hf_checkpoint import load_hf_sharded

    ref, path = _save_tiny(tmp_path, kind)
    meta = build_model(path=path, meta=True)
    assert all(p.is_meta for p in meta.parameters())
    model = PackedCausalLM(meta)
    load_hf_sharded(model, path)
    for (name, p), (_, q) in zip(model.hf.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.hf.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    seqs = [torch.randint(0, ref.config.vocab_size, (n,)) for n in (5, 9)]
    ref_model = PackedCausalLM(ref)
    torch.testing.assert_close(model(*packed(seqs), lambda h, w: h @ w.T), ref_model(*packed(seqs), lambda h, w: h @ w.T))


def test_sharded_load_errors_name_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    from engine.errors import CeilingError
    from engine.models.hf_checkpoint import load_hf_sharded

    _, path = _save_tiny(tmp_path, "llama")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = PackedCausalLM(build_model(path=path, meta=True))
    with pytest.raises(CeilingError, match=r"'model.norm.weight' has shape \[7\], the model expects \[48\]"):
        load_hf_sharded(model, path)
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CeilingError, match="checkpoint has no tensor 'model.norm.weight'"):
        load_hf_sharded(model, path)
    with pytest.raises(CeilingError, match="no model.safetensors"):
        load_hf_sharded(PackedCausalLM(build_model(path=path, meta=True)), tmp_path)


def _sharded_worker(rank, port, tmp_path, kind, out):
    import os

    from engine.config import ModelConfig
    from engine.distributed import destroy_distributed, init_distributed
    from engine.models.hf_checkpoint import save_hf_sharded
    from engine.training import build_policy

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_PORT=str(port))
    info = init_distributed("cpu")
    try:
        path = tmp_path / f"{kind}-hf"
        model, _ = build_policy(ModelConfig(path=str(path), tokenizer=str(path)), 0, info)
        local = {n: (p.to_local().detach().clone(), p.shape) for n, p in model.named_parameters()}
        out[rank] = {n: (t, tuple(s)) for n, (t, s) in local.items()}
        save_hf_sharded(model, tmp_path / "export", max_shard_bytes=20_000)  # several files over both ranks
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_two_ranks_load_their_shards_and_export_sharded(tmp_path, kind="qwen2"):  # tied: the harder case
    import socket

    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    ref, _ = _save_tiny(tmp_path, kind)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_sharded_worker, args=(port, tmp_path, kind, out), nprocs=2)
    ref_params = dict(ref.named_parameters())
    for name, (shard0, shape) in out[0].items():
        full = ref_params[name[len("hf."):]]
        shard1 = out[1][name][0]
        assert shape == tuple(full.shape) and shard0.shape[0] + shard1.shape[0] == full.shape[0]
        assert shard0.shape[0] < full.shape[0]  # no rank holds the full tensor
        torch.testing.assert_close(torch.cat([shard0, shard1]), full, rtol=0, atol=0)
    export = tmp_path / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    for name, p in back.state_dict().items():
        torch.testing.assert_close(p, ref.state_dict()[name], rtol=0, atol=0, msg=name)


def test_sequence_bounds_reach_the_host_once_per_forward_not_per_layer(tmp_path, monkeypatch):
    """The sdpa (CPU) and npu_fusion paths read cu_seqlens on the host; on an NPU each read is a sync."""
    hf = tiny_model(tmp_path, "llama")
    model = PackedCausalLM(hf)
    batch = packed([torch.arange(5), torch.arange(7)])
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.numel()) or real(self))
    model(*batch, lambda h, w: h)
    assert calls == [2] and hf.config.num_hidden_layers == 2
