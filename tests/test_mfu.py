"""MFU convention: 6 x matmul parameters per token (no embedding lookup) + causal attention from real lengths."""

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from engine import flops

SHAPES = {
    "qwen2-tied": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=101, tie_word_embeddings=True),
    "llama-untied-headdim": dict(model_type="llama", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=3, head_dim=16, vocab_size=89,
                                 tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_matmul_params_counts_the_real_models_gemm_weights(name):
    cfg = dict(SHAPES[name])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    emb = model.get_input_embeddings().weight
    gemm = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and p is not emb)
    if model.config.tie_word_embeddings:
        gemm += emb.numel()  # the tied LM head still runs its matmul
    assert flops.matmul_params(model.config) == gemm


def test_mfu_flops_by_hand_and_against_appendix_c():
    cfg = SHAPES["llama-untied-headdim"]
    d = flops.model_dims(cfg)
    n = flops.matmul_params(cfg)
    lengths = [5, 1, 12]
    # attention by counting: each causal (query, key) pair costs 2 d_q for QK^T and 2 d_q for PV, x3 for training;
    # the convention takes s^2/2 pairs per sequence (the diagonal's s/2 is dropped)
    attn = sum(3 * 4 * d.heads * d.head_dim * s * s / 2 for s in lengths) * d.layers
    assert flops.mfu_step_flops(cfg, lengths) == pytest.approx(6 * n * sum(lengths) + attn)
    assert flops.mfu_step_flops(cfg, []) == 0.0
    # packing matters: one sequence of 18 tokens costs more attention than 5 + 1 + 12
    assert flops.mfu_step_flops(cfg, [18]) > flops.mfu_step_flops(cfg, lengths)
    with pytest.raises(ValueError):
        flops.mfu_step_flops(cfg, [3, -1])


def test_embedding_lookup_no_longer_inflates_mfu():
    """At Qwen2.5-1.5B, Appendix C's F(S) counts the 2VH embedding 'GEMM'; the MFU count does not."""
    s = 900
    paper = flops.sft_step_flops("qwen2.5-1.5b", s, s)
    ours = flops.mfu_step_flops("qwen2.5-1.5b", [s])
    d = flops.model_dims("qwen2.5-1.5b")
    assert paper / ours == pytest.approx(1.172, abs=0.002)  # F(S) overstates by 17% at S=900 ...
    lookup = 6 * d.vocab * d.hidden * s
    full_square_attention, causal_attention = 12 * d.layers * d.hidden * s * s, 6 * d.layers * d.hidden * s * s
    assert (paper - lookup) / ours == pytest.approx(1.024, abs=0.001)  # ... 15 points of it the embedding lookup
    assert paper - lookup - full_square_attention + causal_attention == pytest.approx(ours, rel=1e-12)
