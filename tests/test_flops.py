"""FLOPs ledger: the paper's Appendix C formulas, checked against the RETU kit's SFT compute."""

import argparse
import json
from pathlib import Path

import pytest
import transformers

from engine import flops
from engine.errors import CeilingError

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"
RETU = Path(__file__).resolve().parent / "data" / "retu"  # vendored: tests/data/retu/README.md
QWEN7B = MODELS / "qwen2.5-7b.json"


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="ceiling")
    flops.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["flops", *argv])
    return args.func(args)


def test_hand_calculation_qwen25_7b():
    # Qwen2.5-7B: L=28, H=3584, H_ff=18944, 28 heads -> head_dim 128, 4 KV heads -> D_kv=512, V=152064.
    mlp = 3 * 3584 * 18944  # 203,685,888
    attn_proj = 2 * 3584 * (3584 + 512)  # 29,360,128
    vocab = 2 * 152064 * 3584  # 1,089,994,752
    attn = 4 * 3771 * 28 * 3584  # 1,513,709,568 at S = 3771
    per_token = 2 * (28 * (mlp + attn_proj) + vocab) + attn
    assert per_token == 16_744_275_968
    assert flops.forward_flops_per_token(QWEN7B, 3771) == per_token
    per_step = 3 * per_token * 512 * 3771  # B = 512 sequences of mean length 3771
    assert per_step == 96_987_132_941_303_808  # 0.09699 EFLOPs per step
    assert flops.sft_flops(QWEN7B, 512, 3771, 360) == pytest.approx(360 * per_step, rel=1e-15)
    assert flops.sft_step_flops(QWEN7B, 512 * 3771, 3771) == per_step


def test_cli_matches_paper_sft889k_step_360(capsys):
    general = RETU / "general.json"
    paper = json.loads(general.read_text())
    assert (
        run_cli(
            "sft",
            "--model-config",
            str(QWEN7B),
            "--batch-size",
            "512",
            "--mean-seq-len",
            "3771",
            "--steps",
            "360",
            "--json",
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    # The kit's per-step value is reproduced to the last bit; the step table is rounded to 2 decimals.
    assert out["exaflops_per_step"] == pytest.approx(paper["sft_exaflops_per_step"], rel=1e-12)
    assert out["exaflops"] == pytest.approx(34.915367858869374, rel=1e-12)
    assert round(out["exaflops"], 2) == paper["sft_step_exaflops"]["360"] == 34.92
    assert (out["batch_size"], out["mean_seq_len"], out["steps"]) == (512, 3771, 360)
    # The kit's step table sums increments rounded to 0.01 EFLOPs between consecutive checkpoints
    # (e.g. 1440: 4 x 34.92 = 139.68, not round(1440 x 0.09699) = 139.66); reproduce that exactly.
    total, prev = 0.0, 0
    for step in paper["sft_steps"]:
        total = round(total + round((step - prev) * out["exaflops_per_step"], 2), 2)
        prev = step
        assert total == paper["sft_step_exaflops"][str(step)], step
    run_cli(
        "sft",
        "--model-config",
        "qwen2.5-7b",
        "--batch-size",
        "512",
        "--mean-seq-len",
        "3771",
        "--steps",
        "360",
    )
    assert "34.9154 EFLOPs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "scene,batch,seq",
    [("easy102K", 512, 2217), ("uniform102K", 512, 3747), ("hard102K", 512, 8633), ("s1K", 16, 10011)],
)
def test_other_scenes_per_step(scene, batch, seq):
    # The other scenes' per-step compute is the same formula at their own (B, mean length).
    path = RETU / f"{scene}.json"
    paper = json.loads(path.read_text())
    per_step = flops.sft_flops(QWEN7B, batch, seq, 1) / 1e18
    assert per_step == pytest.approx(paper["sft_exaflops_per_step"], rel=1e-12)
    total, prev = 0.0, 0
    for step in paper["sft_steps"]:  # the same rounded-increment table as SFT889K
        total = round(total + round((step - prev) * per_step, 2), 2)
        prev = step
        assert total == paper["sft_step_exaflops"][str(step)], step


@pytest.mark.parametrize(
    "name,cls",
    [
        ("qwen2.5-7b", "Qwen2Config"),
        ("qwen2.5-1.5b", "Qwen2Config"),
        ("qwen2.5-0.5b", "Qwen2Config"),
        ("tiny-qwen2", "Qwen2Config"),
        ("llama3.2-3b", "LlamaConfig"),
    ],
)
def test_model_configs_load_in_transformers(name, cls):
    raw = json.loads((MODELS / f"{name}.json").read_text())
    cfg = getattr(transformers, cls)(**raw)
    if cls == "Qwen2Config":
        transformers.Qwen2Config(**raw)  # every file must at least be accepted by Qwen2Config
    dims = flops.model_dims(cfg)
    assert (
        dims == flops.model_dims(raw) == flops.model_dims(MODELS / f"{name}.json") == flops.model_dims(name)
    )
    assert dims.hidden == dims.heads * dims.head_dim


def test_published_sizes():
    d = flops.model_dims("qwen2.5-7b")
    assert (d.hidden, d.ffn, d.layers, d.heads, d.kv_heads, d.vocab) == (3584, 18944, 28, 28, 4, 152064)
    d = flops.model_dims("llama3.2-3b")
    assert (d.hidden, d.ffn, d.layers, d.heads, d.kv_heads, d.vocab, d.head_dim) == (
        3072,
        8192,
        28,
        24,
        8,
        128256,
        128,
    )
    assert flops.model_dims("tiny-qwen2").vocab == 101  # the character tokenizer's size


def test_rl_formulas():
    F = flops.forward_flops_per_token  # noqa: N806
    B, G, S, K, Bt = 32, 8, 1000.0, 3, 16
    assert flops.grpo_flops(QWEN7B, B, G, S) == pytest.approx(4 * B * G * S * F(QWEN7B, S))
    assert flops.dapo_flops(QWEN7B, B, Bt, G, S, gen_rounds=K, steps=2) == pytest.approx(
        2 * F(QWEN7B, S) * (K * B * G * S + 3 * Bt * G * S)
    )
    # LUFFY/SRFT: 4 [(B G) S_on + (B N) S_off]; S of F is the mean over all sequences.
    N, s_on, s_off = 1, 900.0, 1300.0
    s_mean = (G * s_on + N * s_off) / (G + N)
    for algo in ("luffy", "srft"):
        assert flops.luffy_flops(QWEN7B, B, G, N, s_on, s_off, algo=algo) == pytest.approx(
            4 * (B * G * s_on + B * N * s_off) * F(QWEN7B, s_mean)
        )
    # UPT: B [G S_on + 3 (N_on S_on + N_off S_off)].
    n_on, n_off = 6, 2
    s_upt = (G * s_on + n_on * s_on + n_off * s_off) / (G + n_on + n_off)
    assert flops.upt_flops(QWEN7B, B, G, n_on, n_off, s_on, s_off) == pytest.approx(
        B * (G * s_on + 3 * (n_on * s_on + n_off * s_off)) * F(QWEN7B, s_upt)
    )
    # Real-token form and its errors.
    assert flops.rl_step_flops(
        "dapo", QWEN7B, mean_seq_len=S, gen_tokens=10, update_tokens=5
    ) == pytest.approx(25 * F(QWEN7B, S))
    with pytest.raises(ValueError, match="off-policy"):
        flops.rl_step_flops("grpo", QWEN7B, mean_seq_len=S, gen_tokens=1, update_tokens=1, offpolicy_tokens=1)
    with pytest.raises(ValueError, match="unknown RL algorithm"):
        flops.rl_step_flops("ppo", QWEN7B, mean_seq_len=S, gen_tokens=1, update_tokens=1)


def test_ledger_accumulates_and_resumes():
    ledger = flops.FlopsLedger(QWEN7B)
    step = ledger.add_sft_step(512 * 3771, 3771)
    ledger.add_sft_step(512 * 3771, 3771)
    ledger.add_rl_step("grpo", mean_seq_len=100.0, gen_tokens=1000, update_tokens=1000)
    expected = 2 * step + 4000 * flops.forward_flops_per_token(QWEN7B, 100.0)
    assert ledger.total_flops == pytest.approx(expected) and ledger.exaflops == pytest.approx(expected / 1e18)
    resumed = flops.FlopsLedger(QWEN7B)
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.total_flops == ledger.total_flops


def test_peak_and_mfu():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("cpu") is None
    assert flops.peak_flops("cpu", 1.5) == 1.5e12  # the override is in TFLOP/s and always wins
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", 700) == 700e12
    with pytest.raises(ValueError, match="TFLOP/s"):
        flops.peak_flops("cpu", 989e12)
    assert flops.mfu(494.5e12, 989e12) == pytest.approx(0.5)
    assert flops.mfu(1e12, None) is None


def test_model_config_errors(tmp_path):
    with pytest.raises(CeilingError, match="is not a config.json"):
        flops.model_dims(tmp_path / "missing.json")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(CeilingError, match="intermediate_size"):
        flops.model_dims(tmp_path)  # a model dir works; the missing field is named
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CeilingError, match="bad JSON"):
        flops.model_dims(tmp_path / "bad.json")
