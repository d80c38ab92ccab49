"""SFT data: loss mask on the trajectory only, row forms, over-long rows, malformed rows with file:line."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data.layouts import SFTRow, iter_sft_rows, load_prompt_rows
from engine.data.sft_dataset import DatasetStats, load_sft_file, tokenize_rows
from engine.data.synthetic import SyntheticTaskConfig, write_task
from engine.data.tokenizer import build_char_tokenizer
from engine.errors import DataError

PROMPT_TEXT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_sample_layout_and_loss_mask(tok):
    samples, stats = tokenize_rows(
        [SFTRow([{"role": "user", "content": "1+2?"}], "1+2=3. \\boxed{3}")], tok, 256
    )
    (s,) = samples
    prompt = PROMPT_TEXT.format("1+2?")
    assert tok.decode(s.input_ids) == prompt + "1+2=3. \\boxed{3}<|im_end|>"
    assert len(s.loss_mask) == len(s.input_ids) == len(s)
    n_prompt = len(prompt) - (12 + 10 + 12) + 3  # <|im_start|>, <|im_end|>, <|im_start|>: one token each
    assert s.loss_mask == [0] * n_prompt + [1] * (len("1+2=3. \\boxed{3}") + 1)
    assert s.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and s.loss_mask[-1] == 1
    assert stats == DatasetStats(num_rows=1, num_tokens=len(s), num_loss_tokens=sum(s.loss_mask))


def test_prompt_response_and_messages_forms_agree(tok, tmp_path):
    rows = [
        {"prompt": "Q1", "response": "A1", "answer": 1, "extra": "ignored"},
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]},
        {"prompt": [{"role": "user", "content": "Q1"}], "response": "A1"},
    ]
    path = write_lines(tmp_path / "d.jsonl", rows + [""])  # a trailing blank line is not a row
    samples, stats = load_sft_file(path, tok, 128)
    assert stats.num_rows == 3 and samples[0] == samples[1] == samples[2]
    assert [r.answer for r in iter_sft_rows(path)] == ["1", None, None]
    # Multi-turn: every assistant turn is trained (tests/test_data_layouts.py checks the mask token by token).
    multi = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "B"},
        ]
    }
    (s,), _ = load_sft_file(write_lines(tmp_path / "m.jsonl", [multi]), tok, 256)
    assert tok.decode([i for i, m in zip(s.input_ids, s.loss_mask, strict=True) if m]) == "A<|im_end|>B<|im_end|>"


def test_parquet_matches_jsonl(tok, tmp_path):
    rows = [{"prompt": f"Q{i}", "response": f"A{i}", "answer": str(i)} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a, _ = load_sft_file(tmp_path / "d.parquet", tok, 64)
    b, _ = load_sft_file(write_lines(tmp_path / "d.jsonl", rows), tok, 64)
    assert a == b
    bad = rows[:3] + [{"prompt": "Q", "response": "", "answer": "1"}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:row 3: field 'response' is empty"):
        load_sft_file(tmp_path / "bad.parquet", tok, 64)


def test_overlong_truncate_and_drop(tok, caplog):
    p = [{"role": "user", "content": "Q"}]
    n_prompt = len(tok(PROMPT_TEXT.format("Q"), add_special_tokens=False)["input_ids"])
    rows = [SFTRow(p, "short"), SFTRow(p, "x" * 50), SFTRow([{"role": "user", "content": "Q" * 60}], "y")]
    max_len = n_prompt + 10
    samples, stats = tokenize_rows(rows, tok, max_len, "truncate")
    assert [len(s) for s in samples] == [n_prompt + 6, max_len]
    assert samples[1].loss_mask == [0] * n_prompt + [1] * 10  # response tail cut, prompt kept
    assert (stats.num_rows, stats.num_truncated, stats.num_dropped, stats.num_samples) == (3, 1, 1, 2)
    assert stats.num_tokens == 2 * n_prompt + 16 and stats.num_loss_tokens == 16
    samples, stats = tokenize_rows(rows, tok, max_len, "drop")
    assert [len(s) for s in samples] == [n_prompt + 6]
    assert (stats.num_truncated, stats.num_dropped) == (0, 2)
    with pytest.raises(ValueError, match="overlong"):
        tokenize_rows(rows, tok, max_len, "cut")


def test_load_logs_overlong_and_unknown(tok, tmp_path, caplog):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "Q", "response": "é" + "x" * 100}])
    with caplog.at_level(logging.WARNING):
        _, stats = load_sft_file(path, tok, 60)
    assert stats.num_truncated == 1 and stats.num_unk_tokens == 1
    assert "1 truncated" in caplog.text and "unknown token" in caplog.text
    with pytest.raises(DataError, match="all 1 rows are longer"):
        load_sft_file(path, tok, 60, "drop")


@pytest.mark.parametrize(
    "line,reason",
    [
        ('{"prompt": "Q", "response": "A"', "bad JSON"),
        ('["Q", "A"]', "row must be a JSON object"),
        ('{"prompt": "Q"}', "missing field 'response'"),
        ('{"response": "A"}', "missing field 'prompt'"),
        ('{"prompt": "  ", "response": "A"}', "field 'prompt' is empty"),
        ('{"prompt": 3, "response": "A"}', "field 'prompt' must be a string, got int"),
        ('{"prompt": "Q", "response": "A", "answer": [1]}', "field 'answer' must be a string or a number"),
        ('{"messages": [{"role": "user", "content": "Q"}]}', "'messages' has no assistant turn"),
        (
            '{"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}',
            "last message must be the assistant",
        ),
        (
            '{"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]}',
            r"messages\[1\]\.role",
        ),
        (
            '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 5}]}',
            r"messages\[1\]\.content must be a string",
        ),
        ('{"messages": "hi"}', "must be a non-empty list"),
        (
            '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], '
            '"response": "A"}',
            "not both",
        ),
    ],
)
def test_malformed_rows_name_file_line_and_reason(tok, tmp_path, line, reason):
    good = json.dumps({"prompt": "Q", "response": "A"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", good, line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:4: .*{reason}"):
        load_sft_file(path, tok, 64)


def test_missing_and_empty_files(tok, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_sft_file(tmp_path / "nope.jsonl", tok, 64)
    with pytest.raises(DataError, match="no rows"):
        load_sft_file(write_lines(tmp_path / "e.jsonl", []), tok, 64)


def test_prompt_rows(tmp_path):
    path = write_lines(
        tmp_path / "rl.jsonl",
        [
            {"prompt": "Q1", "answer": "1", "id": "a"},
            {"prompt": "Q2", "answer": 2, "response": "T2"},
        ],
    )
    rows = load_prompt_rows(path)
    assert [(r.id, r.messages, r.answer, r.response) for r in rows] == [
        ("a", [{"role": "user", "content": "Q1"}], "1", None),
        ("1", [{"role": "user", "content": "Q2"}], "2", "T2"),
    ]
    with pytest.raises(DataError, match=r"rl2\.jsonl:2: missing field 'answer'"):
        load_prompt_rows(
            write_lines(tmp_path / "rl2.jsonl", [{"prompt": "Q", "answer": "1"}, {"prompt": "Q"}])
        )


def test_synthetic_task_end_to_end(tok, tmp_path):
    paths = write_task(SyntheticTaskConfig(num_train=200, num_val=20, num_rl=30, num_eval=30), tmp_path)
    samples, stats = load_sft_file(paths["train"], tok, 256)
    assert stats.num_samples == 200 and stats.num_truncated == stats.num_dropped == stats.num_unk_tokens == 0
    assert stats.mean_seq_len < 160
    assert len(load_prompt_rows(paths["rl"])) == 30 and len(load_prompt_rows(paths["eval"])) == 30


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(train_path=""), "train_path"),
        (dict(train_path="a", max_seq_len=1), "max_seq_len"),
        (dict(train_path="a", overlong="cut"), "overlong"),
        (dict(train_path="a", val_path=""), "val_path"),
        (dict(train_path="a", synthetic=SyntheticTaskConfig()), "only one"),
    ],
)
def test_config_validation(kwargs, field):
    from engine.config import DataConfig

    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)
