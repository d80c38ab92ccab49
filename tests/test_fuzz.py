"""Fuzzed user input, fixed seeds: YAML configs and `--set` values, JSONL and Parquet data rows, `ceiling fit` JSON.

Every case must either be accepted or end in one `error: ...` line with exit status 2, never a traceback.
Configs and fit files go through `engine.cli.main` in-process (the job runner is replaced by a no-op, so a
config that loads is simply accepted); data files go through the loaders the trainers use (a `DataError`
is what the CLI prints as `error:`), and a sample of the rejected data cases through `engine.cli.main`
and a real `ceiling` subprocess. Each fuzzer prints how many cases it tried (`pytest -s`).
"""

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engine import cli
from engine.data.layouts import load_prompt_rows
from engine.data.sft_dataset import encode_prompts, load_sft_file
from engine.data.tokenizer import build_char_tokenizer
from engine.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
# More cases or another seed: CEILING_FUZZ_SEED=7 CEILING_FUZZ_SCALE=10 pytest tests/test_fuzz.py -s
SEED = int(os.environ.get("CEILING_FUZZ_SEED", "16"))
SCALE = float(os.environ.get("CEILING_FUZZ_SCALE", "1"))

JUNK = [None, -1, 0, 1, 2**70, -(10**400), 1e308, -1e-320, "x", "", " ", "3e-4", "1e400", True, False, [], [1, "a"], {},
        {"a": 1}, "\x00", "ü∂\u202e\u200b", "😀" * 50, "\ud800", "a" * 5000, float("nan"), float("inf"),
        [[[[[]]]]], {"role": "user", "content": 3}]


def _random_path(rng: random.Random, node, path=()):
    """A random (parent, key) inside a nested dict/list."""
    while isinstance(node, dict | list) and node and rng.random() < 0.75:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        if not isinstance(node[key], dict | list) or not node[key]:
            return node, key
        node = node[key]
    if isinstance(node, dict) and node:
        return node, rng.choice(list(node))
    if isinstance(node, list) and node:
        return node, rng.randrange(len(node))
    return None, None


def mutate_tree(rng: random.Random, tree):
    """One structural mutation: a leaf or section set to junk, a key dropped, an unknown key added."""
    tree = copy.deepcopy(tree)
    if not isinstance(tree, dict | list) or not tree or rng.random() < 0.03:
        return rng.choice(JUNK)
    parent, key = _random_path(rng, tree)
    if parent is None:
        return tree
    op = rng.random()
    if op < 0.6:
        parent[key] = copy.deepcopy(rng.choice(JUNK))
    elif op < 0.75 and isinstance(parent, dict):
        del parent[key]
    elif op < 0.85 and isinstance(parent, dict):
        parent[rng.choice(["nope", "Lr", "", "1", "steps "])] = rng.choice(JUNK)
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(rng.choice(JUNK)))
    else:
        parent[key] = copy.deepcopy(parent)  # a section nested in itself
    return tree


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """One byte-level mutation: cut, bad bytes, a flipped byte, a duplicated span."""
    op = rng.random()
    pos = rng.randrange(len(data) + 1)
    if op < 0.25:
        return data[:pos]
    if op < 0.5:
        return data[:pos] + rng.choice([b"\xff", b"\xc3", b"\x00", b"\xef\xbb\xbf", b"\t", b"\r", b"{", b"]",
                                        b"\xed\xa0\x80", b"\\u", b'"', b": :", b"&a [*a]", b"!!python/name:os.system"])
    if op < 0.75 and data:
        i = rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    end = min(len(data), pos + rng.randrange(64))
    return data[:end] + data[pos:end] * rng.randrange(1, 4) + data[end:]


def _safe_dump(tree) -> bytes:
    return json.dumps(tree, allow_nan=True).encode() if not isinstance(tree, str) else tree.encode("utf-8", "replace")


def _run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, capsys.readouterr().err


def _check_outcome(case: str, code: int, err: str, ok_codes=(0,)) -> str:
    if code in ok_codes:
        return "accepted"
    assert code == 2, f"{case}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{case}:\n{err}"
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") or ": error: " in last, f"{case}: {last}"
    return "rejected"


# ---------------------------------------------------------------- configs and --set


SET_KEYS = ["sft.lr", "sft.steps", "run.name", "run.seed", "data.synthetic", "data.synthetic.num_train",
            "data.train_path", "model.config", "model.dtype", "sft.betas", "rl.n_samples", "rl.algorithm", "sft.nope",
            "nope", "", ".", "sft.", "sft..lr", "run.name.x", "data.synthetic.seed.x", "SFT.LR", "sft.lr ", "=x"]
SET_VALUES = ["[", "{a: 1", "null", "~", "1e400", "-1", "0", "3e-4", "!!binary AAAA", "!!python/object:os.system",
              "'open", "a: b: c", "\t", "ü", "-", "0x10", "1_000", "[1, [2, [3]]]", "&a [*a]", "*b", "true", "[0.9]",
              "dapo_dc", "x" * 3000, "", "=", "\x00", "\\ud800", "{}", "[]"]


@pytest.fixture
def no_run(monkeypatch):
    """The job runner is a no-op: a config that loads is accepted without training."""
    monkeypatch.setattr("engine.sft.trainer.run_sft", lambda job: None)
    monkeypatch.setattr("engine.rl.trainer.run_rl", lambda job: None)


@pytest.mark.parametrize("command,config", [("sft", "sft-tiny.yaml"), ("rl", "rl-tiny.yaml")])
def test_fuzz_yaml_configs_and_set_values(command, config, tmp_path, capsys, no_run):
    rng = random.Random(f"{SEED}-{command}")
    base_text = (ROOT / "configs" / config).read_bytes()
    base = yaml.safe_load(base_text)
    counts = {"accepted": 0, "rejected": 0}
    n_cases = int(250 * SCALE)
    for i in range(n_cases):
        path = tmp_path / f"case{i}.yaml"
        kind = rng.random()
        if kind < 0.45:
            tree = mutate_tree(rng, base)
            path.write_bytes(yaml.safe_dump(tree, allow_unicode=True).encode("utf-8", "surrogatepass")
                             if not isinstance(tree, float) else str(tree).encode())
        elif kind < 0.75:
            data = base_text
            for _ in range(rng.randint(1, 3)):
                data = mutate_bytes(rng, data)
            path.write_bytes(data)
        else:
            path.write_bytes(base_text)
        sets = []
        if kind >= 0.75 or rng.random() < 0.3:
            for _ in range(rng.randint(1, 3)):
                sets += ["--set", f"{rng.choice(SET_KEYS)}={rng.choice(SET_VALUES)}"]
        argv = [command, str(path), *sets]
        code, err = _run_cli(argv, capsys)
        counts[_check_outcome(f"case {i}: {argv} with {path.read_bytes()[:300]!r}", code, err)] += 1
    print(f"\nconfig fuzz ({command}): {n_cases} cases, {counts['rejected']} rejected with `error:` and exit 2, "
          f"{counts['accepted']} accepted")
    assert counts["rejected"] > n_cases // 2 and counts["accepted"] > 0


# ---------------------------------------------------------------- JSONL and Parquet rows


BASE_ROWS = [
    {"prompt": "Tom has 3 pens and buys 4 more. How many?", "response": "3+4=7. \\boxed{7}", "answer": "7"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2*5?"},
                  {"role": "assistant", "content": "\\boxed{10}"}], "answer": 10},
    {"prompt": [{"role": "user", "content": "9-4?"}], "response": "\\boxed{5}", "answer": "5", "id": "q3"},
]
ODD_TEXT = ["\ud800", "\udfff x", "\u202eRTL", "e\u0301\u0301\u0301", "\u200b", "😀" * 1000, "\x00nul", "\ufeffbom",
            "a" * 300_000, "\r\n", "\\boxed{", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u0085next-line", "\u2028"]


def _mutate_row(rng: random.Random, row: dict):
    if rng.random() < 0.5:
        row = mutate_tree(rng, row)
    else:
        row = copy.deepcopy(row)
        parent, key = _random_path(rng, row)
        if parent is not None:
            parent[key] = rng.choice(ODD_TEXT)
    return row


def _jsonl_case(rng: random.Random) -> bytes:
    rows = [copy.deepcopy(rng.choice(BASE_ROWS)) for _ in range(rng.randint(1, 4))]
    k = rng.randrange(len(rows))
    rows[k] = _mutate_row(rng, rows[k])
    lines = [json.dumps(r, allow_nan=True, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
             for r in rows]
    if rng.random() < 0.4:
        lines[k] = mutate_bytes(rng, lines[k])
    if rng.random() < 0.05:
        lines.append(b"[" * 200_000)  # nesting deeper than any parser's recursion limit
    return b"\n".join(lines) + rng.choice([b"\n", b"", b"\r\n", b"\n\n  \n"])


def _load_both(path: Path, tokenizer):
    """The SFT loader (read, validate, tokenize) and the RL prompt loader (read, validate, encode)."""
    outcomes = []
    for load in (lambda: load_sft_file(path, tokenizer, 256), lambda: encode_prompts(
            [r.messages for r in load_prompt_rows(path)], tokenizer)):
        try:
            load()
            outcomes.append("accepted")
        except DataError as exc:
            assert str(exc).startswith(str(path)), f"the error does not name the file: {exc}"
            outcomes.append("rejected")
    return outcomes


def test_fuzz_jsonl_rows(tmp_path, capsys):
    rng = random.Random(f"{SEED}-jsonl")
    tokenizer = build_char_tokenizer()
    counts = {"accepted": 0, "rejected": 0}
    rejected = []
    n_cases = int(250 * SCALE)
    for i in range(n_cases):
        path = tmp_path / f"case{i}.jsonl"
        path.write_bytes(_jsonl_case(rng))
        try:
            outcomes = _load_both(path, tokenizer)
        except Exception as exc:
            raise AssertionError(f"case {i}: {type(exc).__name__}: {exc}\n{path.read_bytes()[:500]!r}") from exc
        for o in outcomes:
            counts[o] += 1
        if outcomes[0] == "rejected":
            rejected.append(path)
    # The CLI on a sample of the rejected files: one `error:` line naming the file, exit 2.
    for path in rejected[:3]:
        code, err = _run_cli(["sft", str(ROOT / "configs" / "sft-tiny.yaml"), "--set", "data.synthetic=null",
                              "--set", f"data.train_path={path}", "--set", f"run.output_dir={tmp_path / 'runs'}",
                              "--set", f"run.name=r{path.stem}", "--set", "run.device=cpu"], capsys)
        assert _check_outcome(str(path), code, err) == "rejected" and str(path) in err.strip().splitlines()[-1]
    print(f"\nJSONL fuzz: {n_cases} files x 2 loaders (SFT, RL prompts): {counts['rejected']} rejected with a "
          f"DataError naming the file, {counts['accepted']} accepted; {min(3, len(rejected))} rejected files "
          "rerun through `ceiling sft`: exit 2")
    assert counts["rejected"] > n_cases // 2 and counts["accepted"] > 0


PARQUET_COLUMNS = {
    "prompt": [pa.array(["a", "b"]), pa.array([1, 2]), pa.array([None, None], pa.string()), pa.array([b"\xff", b"x"]),
               pa.array([[1], [2]]), pa.array([{"role": "user", "content": "x"}, None]),
               pa.array([[{"role": "user", "content": "q"}], [{"role": "bot", "content": "q"}]]),
               pa.array(["\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "z" * 100_000]),
               pa.array([1.5, float("nan")]), pa.array([True, False])],
    "response": [pa.array(["\\boxed{1}", "\\boxed{2}"]), pa.array([None, "x"]), pa.array([[1, 2], []]),
                 pa.array([b"\\boxed{1}", b"\x00"]), pa.array(["", " "])],
    "answer": [pa.array(["1", "2"]), pa.array([1, 2]), pa.array([None, None], pa.int64()), pa.array([[1], [2]]),
               pa.array([True, False]), pa.array([2**62, -1])],
}


def test_fuzz_parquet_rows(tmp_path, capsys):
    rng = random.Random(f"{SEED}-parquet")
    tokenizer = build_char_tokenizer()
    counts = {"accepted": 0, "rejected": 0}
    n_cases = int(120 * SCALE)
    for i in range(n_cases):
        path = tmp_path / f"case{i}.parquet"
        columns = {name: rng.choice(options) for name, options in PARQUET_COLUMNS.items() if rng.random() < 0.9}
        if rng.random() < 0.3:
            columns = {name: PARQUET_COLUMNS[name][0] for name in PARQUET_COLUMNS}
        pq.write_table(pa.table(columns) if columns else pa.table({"x": [1]}), path,
                       compression=rng.choice(["snappy", "zstd", "none"]))
        if rng.random() < 0.5:  # damage the file: cut it or flip bytes (footer, page headers, data)
            data = path.read_bytes()
            for _ in range(rng.randint(1, 4)):
                data = mutate_bytes(rng, data)
            path.write_bytes(data)
        try:
            outcomes = _load_both(path, tokenizer)
        except Exception as exc:
            raise AssertionError(f"case {i}: {type(exc).__name__}: {exc}") from exc
        for o in outcomes:
            counts[o] += 1
    print(f"\nParquet fuzz: {n_cases} files x 2 loaders: {counts['rejected']} rejected with a DataError naming the "
          f"file, {counts['accepted']} accepted")
    assert counts["rejected"] > n_cases // 2 and counts["accepted"] > 0


def test_bad_data_through_the_cli(tmp_path, capsys):
    """A bad byte on line 2 (once reported on line 1: text-mode reads decode ahead) and a lone surrogate, through
    a real `ceiling` subprocess and through `engine.cli.main`: one `error:` line naming the file and line, exit 2."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(BASE_ROWS[0]).encode() + b"\n" + b'{"prompt": "\xff\xfe", "response": 1}\n')
    lone = tmp_path / "lone.jsonl"
    lone.write_text(json.dumps({"prompt": "\ud800", "response": "\\boxed{1}"}) + "\n")

    def argv(path):
        return ["sft", str(ROOT / "configs" / "sft-tiny.yaml"), "--set", "data.synthetic=null",
                "--set", f"data.train_path={path}", "--set", f"run.output_dir={tmp_path / 'runs'}",
                "--set", f"run.name={path.stem}", "--set", "run.device=cpu"]

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}  # set by in-process runs
    out = subprocess.run([sys.executable, "-m", "engine.cli", *argv(bad)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: not valid UTF-8"), out.stderr
    code, err = _run_cli(argv(lone), capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {lone}:1: field 'prompt'"), err


# ---------------------------------------------------------------- `ceiling fit` JSON


def _small_scene() -> dict:
    scene = json.loads(Path(ROOT / "tests" / "data" / "retu" / "s1K.json").read_text())
    keep = ["0", "124"]
    scene["rl"] = {k: scene["rl"][k] for k in keep}
    scene["sft_step_cache_exaflops"] = {k: scene["sft_step_cache_exaflops"][k] for k in keep}
    return scene


def test_fuzz_fit_json(tmp_path, capsys):
    rng = random.Random(f"{SEED}-fit")
    base = _small_scene()
    base_text = json.dumps(base).encode()
    counts = {"accepted": 0, "rejected": 0}
    n_cases = int(200 * SCALE)
    for i in range(n_cases):
        path = tmp_path / f"scene{i}.json"
        if rng.random() < 0.6:
            tree = base
            for _ in range(rng.randint(1, 3)):
                tree = mutate_tree(rng, tree)
            try:
                data = json.dumps(tree, allow_nan=True).encode("utf-8", "surrogatepass")
            except (ValueError, RecursionError):  # a section nested in itself cannot be written as JSON
                data = base_text[: rng.randrange(len(base_text))]
        else:
            data = base_text
            for _ in range(rng.randint(1, 3)):
                data = mutate_bytes(rng, data)
        path.write_bytes(data)
        argv = ["fit", str(path), "--branch", rng.choice(["0", "124", "7"])]
        if rng.random() < 0.05:
            argv = ["fit", str(path), "--early-stop", "--out", str(tmp_path / f"out{i}")]
        code, err = _run_cli(argv, capsys)
        counts[_check_outcome(f"case {i}: {data[:300]!r}", code, err, ok_codes=(0, 1))] += 1
    print(f"\nfit JSON fuzz: {n_cases} cases, {counts['rejected']} rejected with `error:` and exit 2, "
          f"{counts['accepted']} fitted (exit 0/1)")
    assert counts["rejected"] > n_cases // 2 and counts["accepted"] > 0


def test_data_source_conflict_names_the_fix(capsys, no_run, tmp_path):
    config = str(ROOT / "configs" / "sft-tiny.yaml")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "q", "response": "a"}\n')
    code, err = _run_cli(["sft", config, "--set", f"data.train_path={rows}"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "--set data.synthetic=null" in last and "data: data:" not in last, last
    assert _run_cli(["sft", config, "--set", f"data.train_path={rows}", "--set", "data.synthetic=null"],
                    capsys)[0] == 0
    code, err = _run_cli(["sft", config, "--set", f"data.train_path={tmp_path / 'none.jsonl'}", "--set",
                          "data.synthetic=null"], capsys)  # a missing file is named before any work
    assert code == 2 and "data.train_path" in err and "does not exist" in err, err
