"""Token store at the paper's data scale: tokenization speed (1..N processes), and the resident memory of a
2-rank SFT run.

    python benchmarks/bench_token_store.py                      # 2% of SFT889K's rows, full length profile
    python benchmarks/bench_token_store.py --rows-fraction 1.0  # all 889K rows (~3.3B tokens, ~16 GB store; hours here)
    python benchmarks/bench_token_store.py --rows-fraction 0.0015 --workers 1 2 --no-train   # tokenization only
    python benchmarks/bench_token_store.py --open-peak          # peak memory of opening a store (no tokenizing)
    python benchmarks/bench_token_store.py --smoke              # seconds: checks the script runs

The data imitate SFT889K: 889K rows x `--rows-fraction`, total lengths lognormal with mean 3.7K tokens
(sigma 0.7, clipped to [64, max_seq_len]), a short prompt and a long trajectory of words. The tokenizer is a
real byte-level BPE trained here with the `tokenizers` library (no tokenizer can be downloaded), saved as an
HF tokenizer dir with the ChatML template. Two files are written: the first 10% of the rows, and all of
them. The 100% store is built once per `--workers` count (chat template, BPE, write; 1 = one process, N =
N spawned processes each tokenizing a contiguous shard), timed, and checked byte-identical across counts;
the peak RSS of the building parent and of its largest worker are reported. Then, for each file, `ceiling
sft` runs for `--steps` steps on 2 gloo ranks (torchrun, a tiny Qwen2 model) reading the store, and each
rank reports its peak resident memory (VmHWM) after init and at the end, its final VmRSS, and the
anonymous/file-backed split. The claim checked: per-rank memory is within 2 GiB and does not grow from the
10% to the 100% dataset.

Where the old peak came from (1.60 -> 1.82 GiB VmHWM between the 10% and the 100% dataset at 2%, commit
a935b7d): not the training step. `TokenStore._loss_counts` read the loss mask of up to 65,536 samples at
once and widened it to int64 twice (mask, cumsum, concatenated cumsum: 25 bytes per token), so opening the
61M-token store peaked at 1.77 GiB before any step ran (measured: VmHWM 0.39 -> 1.77 GiB around
`TokenStore(path)`), and at full scale it would have been ~5.7 GB per rank. It now reads LOSS_COUNT_TOKENS
(4M) mask bytes at a time: the same store opens with a peak of +0.07 GiB (`--open-peak`). What remains of a
rank's peak (1.58-1.61 GiB at 0.5%, vs 0.46-0.50 GiB after init) is the training step on micro-batches of up
to 8192 tokens, the same for the 10% and the 100% store.
"""

from __future__ import annotations

import argparse
import hashlib
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
    from engine.config import SFTJobConfig, load_config
    from engine.sft.trainer import SFTTrainer
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


def vm(field: str) -> float:
    """A /proc/self/status memory field in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def open_peak(args) -> None:
    """Peak RSS of opening a store of `--rows-fraction` x 889K samples, written directly (nothing tokenized)."""
    if args.open_peak == "child":
        from engine.data.token_store import TokenStore

        before = vm("VmHWM")
        t0 = time.perf_counter()
        store = TokenStore(args.workdir)
        print(json.dumps({"samples": len(store), "tokens": int(store.offsets_N1[-1]), "hwm_before": before,
                          "hwm_after": vm("VmHWM"), "open_s": time.perf_counter() - t0}))
        return
    import torch

    from engine.data.token_store_build import FILES, publish

    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    folder, store = Path(tmp.name) / "tmp", Path(tmp.name) / "store"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = max(20, round(PAPER_ROWS * args.rows_fraction))
    lengths = rng.lognormal(np.log(MEAN_TOKENS) - 0.245, 0.7, n).clip(64, args.max_len - 16).astype(np.int64)
    ends = np.cumsum(lengths)
    np.zeros(int(ends[-1]), np.int32).tofile(folder / FILES["tokens"][0])
    mask = np.ones(int(ends[-1]), np.uint8)
    mask[ends[:-1]] = 0  # each sample's first token is prompt
    mask.tofile(folder / FILES["mask"][0])
    np.concatenate([[0], ends]).tofile(folder / FILES["offsets"][0])
    del mask
    publish(folder, store, n, int(ends[-1]), {})
    out = subprocess.run([sys.executable, __file__, "--open-peak", "child", "--workdir", str(store)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    r = json.loads(out.stdout.splitlines()[-1])
    rows = [{**r, "growth": r["hwm_after"] - r["hwm_before"]}]
    columns = [("samples", "samples", ",d"), ("tokens", "tokens", ",d"), ("open_s", "open s", ".2f"),
               ("hwm_before", "peak RSS before GiB", ".2f"), ("hwm_after", "peak RSS after open GiB", ".2f"),
               ("growth", "growth GiB", ".3f")]
    title = f"Token store open: peak RSS of TokenStore(path) at {args.rows_fraction:g} x 889K samples"
    print_table(title, rows, columns)
    if not args.no_record:
        append_results(title, environment(torch.device("cpu")), rows, columns)


def build_once(paths, tok, args, root: Path, workers: int) -> dict:
    """Build the store of `paths` in a fresh `root` with `workers` processes: time, peak RSS, the store's bytes."""
    import resource

    from engine.data.token_store import build_token_store, store_key

    hwm0, t0 = vm("VmHWM"), time.perf_counter()
    out = build_token_store(paths, tok, args.max_len, "truncate", root / store_key(paths, tok, args.max_len,
                            "truncate"), progress=True, workers=workers)
    seconds = time.perf_counter() - t0
    digest = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("tokens.i32", "mask.u8", "offsets.i64")}
    tokens = json.loads((out / "meta.json").read_text())["num_tokens"]
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB, largest child so far
    return {"workers": workers, "tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
            "hwm_parent": vm("VmHWM"), "hwm_parent_growth": vm("VmHWM") - hwm0,
            "hwm_child": child if workers > 1 else float("nan"), "digest": digest, "path": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-fraction", type=float, default=0.02, help="fraction of SFT889K's 889K rows")
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="tokenization process counts to time")
    ap.add_argument("--no-train", action="store_true", help="tokenization only: skip the 2-rank SFT runs")
    ap.add_argument("--open-peak", nargs="?", const="parent", default=None,
                    help="measure the peak RSS of opening a store instead")
    ap.add_argument("--workdir", default=None, help="default: a temporary dir (deleted afterwards)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.smoke:
        args.rows_fraction, args.max_len, args.steps, args.no_record = 0.0005, 8192, 2, True
    if args.open_peak:
        return open_peak(args)
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
    env = environment(torch.device("cpu"))
    builds = [build_once([full], tok, args, work / f"build{w}", w) for w in args.workers]
    for b in builds:
        b["speedup"] = b["tok_per_s"] / builds[0]["tok_per_s"]
        b["identical"] = "yes" if b["digest"] == builds[0]["digest"] else "NO"
    columns = [("workers", "workers", "d"), ("tokens", "tokens", ",d"), ("seconds", "seconds", ".1f"),
               ("tok_per_s", "tokenize tok/s", ",.0f"), ("speedup", "speedup", ".2f"),
               ("identical", "same bytes as first", ""), ("hwm_parent", "parent peak RSS GiB", ".2f"),
               ("hwm_child", "largest worker peak RSS GiB", ".2f")]
    title = (f"Token store build: {n_rows:,} rows ({args.rows_fraction:g} x 889K, lognormal lengths, mean "
             f"{MEAN_TOKENS} tokens, max {args.max_len}), byte-level BPE vocab {args.vocab}; {os.cpu_count()} "
             f"CPU cores, load average {os.getloadavg()[0]:.1f} at the end")
    print_table(title, builds, columns)
    if not args.no_record:
        append_results(title, env, builds, columns)
    if any(b["identical"] != "yes" for b in builds):
        raise SystemExit("stores built with different worker counts differ")
    if args.no_train:
        return
    rows = []
    for name, path in (("10%", part), ("100%", full)):
        t0 = time.perf_counter()
        file_digest(path)
        hash_s = time.perf_counter() - t0
        store_root = builds[0]["path"].parent  # the 100% store is there already (timed above)
        t0 = time.perf_counter()
        store = open_token_store([path], tok, args.max_len, "truncate", store_root, progress=True)
        build_s = time.perf_counter() - t0 - hash_s
        tokens = int(store.offsets_N1[-1])
        tok_per_s = builds[0]["tok_per_s"] if name == "100%" else tokens / build_s
        run_dir = work / f"run_{name[:-1]}"
        run_dir.mkdir()
        ranks = run_ranks(worker_config(run_dir, work / "tokenizer", path, store_root, len(tok), args))
        for r in sorted(ranks, key=lambda r: r["rank"]):
            rows.append({"data": name, "rows": len(store), "tokens": tokens, "mean_len": tokens / len(store),
                         "json_gb": path.stat().st_size / 1e9, "store_gb": tokens * 5 / 1e9,
                         "tok_per_s": tok_per_s, "hash_s": hash_s, "rank": r["rank"],
                         "hwm_init": r["init"]["VmHWM"], "hwm": r["end"]["VmHWM"], "rss_init": r["init"]["VmRSS"],
                         "rss_end": r["end"]["VmRSS"], "anon": r["end"]["RssAnon"], "file": r["end"]["RssFile"]})
    columns = [("data", "data", ""), ("rows", "rows", ",d"), ("tokens", "tokens", ",d"), ("mean_len", "mean len", ",.0f"),
               ("json_gb", "JSONL GB", ".2f"), ("store_gb", "store GB", ".2f"), ("tok_per_s", "tokenize tok/s", ",.0f"),
               ("hash_s", "hash s", ".1f"), ("rank", "rank", "d"), ("hwm_init", "peak RSS after init GiB", ".2f"),
               ("hwm", "peak RSS GiB", ".2f"), ("rss_init", "RSS after init GiB", ".2f"),
               ("rss_end", "RSS end GiB", ".2f"), ("anon", "anon GiB", ".2f"), ("file", "file-backed GiB", ".2f")]
    title = (f"Token store: {args.rows_fraction:g} x 889K rows (lognormal lengths, mean {MEAN_TOKENS} tokens, "
             f"max {args.max_len}), byte-level BPE vocab {args.vocab}; 2-rank gloo SFT, {args.steps} steps of 8 "
             f"sequences, tiny Qwen2; {os.cpu_count()} CPU cores")
    print_table(title, rows, columns)
    worst = max(r["hwm"] for r in rows)
    growth = max(r["hwm"] for r in rows if r["data"] == "100%") - max(r["hwm"] for r in rows if r["data"] == "10%")
    print(f"max per-rank peak RSS {worst:.2f} GiB (limit 2 GiB); growth 10% -> 100%: {growth * 1024:+.0f} MiB")
    if not args.no_record:
        append_results(title, env, rows, columns)
    if worst > 2.0:
        raise SystemExit("per-rank peak RSS above 2 GiB")


if __name__ == "__main__":
    main()
