"""Token store at the paper's data scale: tokenization speed, and the resident memory of a 2-rank SFT run.

    python benchmarks/bench_token_store.py                      # 2% of SFT889K's rows, full length profile
    python benchmarks/bench_token_store.py --rows-fraction 1.0  # all 889K rows (~3.3B tokens, ~16 GB store; hours here)
    python benchmarks/bench_token_store.py --smoke              # seconds: checks the script runs

The data imitate SFT889K: 889K rows x `--rows-fraction`, total lengths lognormal with mean 3.7K tokens
(sigma 0.7, clipped to [64, max_seq_len]), a short prompt and a long trajectory of words. The tokenizer is a
real byte-level BPE trained here with the `tokenizers` library (no tokenizer can be downloaded), saved as an
HF tokenizer dir with the ChatML template. Two files are written: the first 10% of the rows, and all of
them. For each: the store is built (one process, as rank 0 does: chat template, BPE, write) and timed, then
`ceiling sft` runs for `--steps` steps on 2 gloo ranks (torchrun, a tiny Qwen2 model) reading it, and each
rank reports its peak resident memory (VmHWM), its final VmRSS, and the anonymous/file-backed split.
The claim checked: per-rank memory is within 2 GiB and does not grow from the 10% to the 100% dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import append_results, environment, print_table  # noqa: E402

PAPER_ROWS = 889_000
MEAN_TOKENS = 3700
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
          "{%- endif %}")


def make_words(rng, n=20000):
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 10, n)
    words = ["".join(rng.choice(letters, k)) for k in lengths]
    return np.array(words + [str(i) for i in range(100)] + ["=", "+", "\\boxed{", "}", "x", ".", ","])


def train_tokenizer(words, rng, out_dir: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = (" ".join(rng.choice(words, 500)) for _ in range(4000))
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(out_dir)
    return hf


def write_rows(path: Path, n_rows: int, words, rng, tokens_per_word: float, max_len: int) -> None:
    sigma = 0.7
    totals = rng.lognormal(np.log(MEAN_TOKENS) - sigma**2 / 2, sigma, n_rows).clip(64, max_len - 16)
    with path.open("w") as f:
        for total in totals:
            n_prompt = int(rng.integers(20, 120))
            n_resp = max(8, int((total - 12) / tokens_per_word) - n_prompt)
            prompt = " ".join(rng.choice(words, n_prompt))
            response = " ".join(rng.choice(words, n_resp))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def calibrate(tok, words, rng) -> float:
    text = [" ".join(rng.choice(words, 1000)) for _ in range(20)]
    return sum(len(tok(t)["input_ids"]) for t in text) / 20000


def worker_config(run_dir: Path, tok_dir: Path, train: Path, store_root: Path, vocab: int, args) -> Path:
    model = run_dir / "model.json"
    model.write_text(json.dumps(dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                     max_position_embeddings=args.max_len, tie_word_embeddings=True)))
    import yaml

    cfg = {"run": {"name": "rss", "output_dir": str(run_dir), "device": "cpu", "progress": False, "log_every": 5},
           "model": {"config": str(model), "tokenizer": str(tok_dir)},
           "data": {"train_path": str(train), "max_seq_len": args.max_len},
           "sft": {"steps": args.steps, "global_batch_size": 8, "micro_batch_tokens": args.max_len, "lr": 1e-4,
                   "val_every": 0, "checkpoint_every": 0, "keep_checkpoints": 1, "export_hf": False,
                   "token_store_dir": str(store_root)}}
    path = run_dir / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def worker(config: str) -> None:
    """One rank of `ceiling sft` that prints its memory as JSON at the end."""
    from engine.config import load_config
    from engine.sft.trainer import SFTJobConfig, SFTTrainer

    def status():
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
        return fields

    trainer = SFTTrainer(load_config(config, SFTJobConfig))
    after_init = status()
    trainer.fit()
    record = {"rank": trainer.info.rank, "init": after_init, "end": status(), "samples": len(trainer.train)}
    (trainer.run_dir / f"rss{trainer.info.rank}.json").write_text(json.dumps(record))  # rank stdout interleaves


def run_ranks(config: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29600 + os.getpid() % 1000), __file__, "--worker", str(config)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"2-rank SFT run failed:\n{out.stderr[-4000:]}")
    run_dir = config.parent / "rss"
    return [json.loads((run_dir / f"rss{r}.json").read_text()) for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-fraction", type=float, default=0.02, help="fraction of SFT889K's 889K rows")
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workdir", default=None, help="default: a temporary dir (deleted afterwards)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.smoke:
        args.rows_fraction, args.max_len, args.steps, args.no_record = 0.0005, 8192, 2, True
    import torch

    from engine.data.token_store import file_digest, open_token_store
    from engine.data.tokenizer import load_tokenizer

    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    work = Path(tmp.name)
    rng = np.random.default_rng(0)
    words = make_words(rng)
    tok = train_tokenizer(words, rng, work / "tokenizer", args.vocab)
    tok = load_tokenizer(work / "tokenizer")
    per_word = calibrate(tok, words, rng)
    n_rows = max(20, round(PAPER_ROWS * args.rows_fraction))
    full = work / "rows_100.jsonl"
    write_rows(full, n_rows, words, rng, per_word, args.max_len)
    part = work / "rows_10.jsonl"
    with full.open() as src, part.open("w") as dst:
        for _ in range(max(2, n_rows // 10)):
            dst.write(src.readline())
    rows = []
    for name, path in (("10%", part), ("100%", full)):
        t0 = time.perf_counter()
        file_digest(path)
        hash_s = time.perf_counter() - t0
        store_root = work / "stores"
        t0 = time.perf_counter()
        store = open_token_store([path], tok, args.max_len, "truncate", store_root, progress=True)
        build_s = time.perf_counter() - t0 - hash_s
        tokens = int(store.offsets_N1[-1])
        run_dir = work / f"run_{name[:-1]}"
        run_dir.mkdir()
        ranks = run_ranks(worker_config(run_dir, work / "tokenizer", path, store_root, len(tok), args))
        for r in sorted(ranks, key=lambda r: r["rank"]):
            rows.append({"data": name, "rows": len(store), "tokens": tokens, "mean_len": tokens / len(store),
                         "json_gb": path.stat().st_size / 1e9, "store_gb": tokens * 5 / 1e9,
                         "tok_per_s": tokens / build_s, "hash_s": hash_s, "rank": r["rank"],
                         "hwm": r["end"]["VmHWM"], "rss_init": r["init"]["VmRSS"], "rss_end": r["end"]["VmRSS"],
                         "anon": r["end"]["RssAnon"], "file": r["end"]["RssFile"]})
    columns = [("data", "data", ""), ("rows", "rows", ",d"), ("tokens", "tokens", ",d"), ("mean_len", "mean len", ",.0f"),
               ("json_gb", "JSONL GB", ".2f"), ("store_gb", "store GB", ".2f"), ("tok_per_s", "tokenize tok/s", ",.0f"),
               ("hash_s", "hash s", ".1f"), ("rank", "rank", "d"), ("hwm", "peak RSS GiB", ".2f"),
               ("rss_init", "RSS after init GiB", ".2f"), ("rss_end", "RSS end GiB", ".2f"),
               ("anon", "anon GiB", ".2f"), ("file", "file-backed GiB", ".2f")]
    title = (f"Token store: {args.rows_fraction:g} x 889K rows (lognormal lengths, mean {MEAN_TOKENS} tokens, "
             f"max {args.max_len}), byte-level BPE vocab {args.vocab}; 2-rank gloo SFT, {args.steps} steps of 8 "
             f"sequences, tiny Qwen2; {os.cpu_count()} CPU cores")
    print_table(title, rows, columns)
    worst = max(r["hwm"] for r in rows)
    growth = max(r["hwm"] for r in rows if r["data"] == "100%") - max(r["hwm"] for r in rows if r["data"] == "10%")
    print(f"max per-rank peak RSS {worst:.2f} GiB (limit 2 GiB); growth 10% -> 100%: {growth * 1024:+.0f} MiB")
    if not args.no_record:
        append_results(title, environment(torch.device("cpu")), rows, columns)
    if worst > 2.0:
        raise SystemExit("per-rank peak RSS above 2 GiB")


if __name__ == "__main__":
    main()
