"""SFT data: read expert-trajectory rows, tokenize with the chat template, mask the loss to the trajectory.

Row forms (JSONL, one object per line, or Parquet, one row per record; extra fields are ignored):
    {"prompt": str | [messages], "response": str, "answer": str|int (optional)}
    {"messages": [{"role", "content"}, ...]}   the final message is the assistant's trajectory;
                                               everything before it is the prompt
A sample is `prompt_ids + response_ids`: prompt_ids is the chat template applied to the prompt
messages with `add_generation_prompt=True`; response_ids is the trajectory followed by the
end-of-turn token (`<|im_end|>`, `<|eot_id|>`, else eos). `loss_mask` is 1 on response ids only.

Over-long samples (> max_seq_len tokens): `overlong="truncate"` keeps the prompt and cuts the
response tail (the sample is dropped if the prompt leaves no room for a response token);
`overlong="drop"` drops them. Both are counted in `DatasetStats` and logged, never silent.
A malformed row raises `DataError("file.jsonl:17: missing field 'response'")` (Parquet: "file:row N").

`load_prompt_rows` reads RL prompt sets ({prompt, answer, optional id and response}) the same way.
Rows are read and tokenized in chunks, so memory stays proportional to the kept samples. Training does
not hold samples in memory: engine/data/token_store.py writes them once to flat files it reads lazily.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from engine.data.tokenizer import end_of_turn_id
from engine.errors import DataError

log = logging.getLogger(__name__)

OVERLONG_POLICIES = ("truncate", "drop")
ROLES = ("system", "user", "assistant", "tool")
CHUNK_ROWS = 2048  # rows tokenized per batch call


@dataclass
class SFTRow:
    """One validated row: prompt messages, the expert trajectory, the reference answer (or None)."""

    messages: list[dict[str, str]]
    response: str
    answer: str | None = None


@dataclass
class PromptRow:
    """One RL prompt: id, prompt messages, reference answer, optional expert trajectory."""

    id: str
    messages: list[dict[str, str]]
    answer: str
    response: str | None = None


@dataclass
class SFTSample:
    """A tokenized sample; `loss_mask[i]` is 1 where `input_ids[i]` is a trajectory token."""

    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DatasetStats:
    """Counts over one tokenization pass (`num_rows` read; kept samples = num_rows - num_dropped)."""

    num_rows: int = 0
    num_truncated: int = 0
    num_dropped: int = 0
    num_tokens: int = 0
    num_loss_tokens: int = 0
    num_unk_tokens: int = 0
    """Tokens that are the tokenizer's <unk> (characters it cannot encode)."""

    @property
    def num_samples(self) -> int:
        return self.num_rows - self.num_dropped

    @property
    def mean_seq_len(self) -> float:
        return self.num_tokens / self.num_samples if self.num_samples else 0.0

    def merge(self, other: DatasetStats) -> None:
        for name in (
            "num_rows",
            "num_truncated",
            "num_dropped",
            "num_tokens",
            "num_loss_tokens",
            "num_unk_tokens",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Where:
    """Location of a raw row, for error messages."""

    path: str
    index: int  # 1-based JSONL line, or 0-based Parquet row
    parquet: bool = False

    def __str__(self) -> str:
        return f"{self.path}:row {self.index}" if self.parquet else f"{self.path}:{self.index}"


# --- reading ----------------------------------------------------------------------------------------


def iter_parquet_batches(path: Path, batches, index: int = 0) -> Iterator[tuple[_Where, Any]]:
    """(location, row) of each row in `batches` (pyarrow record batches of `path`), numbered from `index`."""
    while True:
        try:  # a damaged page or column chunk fails here, not when the file is opened
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else []
        except Exception as exc:
            raise DataError(f"{path}:row {index}: cannot read the Parquet data from here on: {exc}") from exc
        if batch is None:
            return
        for row in rows:
            yield _Where(str(path), index, parquet=True), row
            index += 1


def jsonl_line_row(path: Path, lineno: int, raw: bytes) -> Iterator[tuple[_Where, Any]]:
    """The row on one JSONL line, with its location; none for a blank line (e.g. a trailing newline)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start} of the line: "
                        f"{raw[exc.start:exc.start + 1]!r}, {exc.reason})") from None
    if not line.strip():
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: bad JSON: {exc.msg} (column {exc.colno})") from exc
    except RecursionError:
        raise DataError(f"{path}:{lineno}: bad JSON: nested too deeply") from None
    yield _Where(str(path), lineno), row


def iter_raw_rows(path: str | Path) -> Iterator[tuple[_Where, Any]]:
    """Yield (location, decoded row) from a .jsonl/.json-lines or .parquet file, streaming."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
        yield from iter_parquet_batches(path, pf.iter_batches(batch_size=CHUNK_ROWS))
        return
    with path.open("rb") as f:  # decoded line by line, so a bad byte is reported on its own line
        for lineno, raw in enumerate(f, start=1):
            yield from jsonl_line_row(path, lineno, raw)


def _text(where: _Where, row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return _unicode(where, key, value)


def _unicode(where: _Where, key: str, value: str) -> str:
    """`value`, if it can be encoded (JSON's `\\ud800` escapes decode to lone surrogates, which tokenizers reject)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: field {key!r} is not valid Unicode: a lone surrogate "
                        f"{value[exc.start]!r} at character {exc.start}") from None
    return value


def _answer(where: _Where, row: dict, required: bool) -> str | None:
    value = row.get("answer")
    if value is None:
        if required:
            raise DataError(f"{where}: missing field 'answer'")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field 'answer' must be a string or a number, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise DataError(f"{where}: field 'answer' is empty")
    return _unicode(where, "answer", value)


def _messages(where: _Where, value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": _unicode(where, f"{key}[{i}].content", content)})
    return out


def _prompt_messages(where: _Where, row: dict) -> list[dict[str, str]]:
    if "prompt" not in row or row["prompt"] is None:
        raise DataError(f"{where}: missing field 'prompt'")
    if isinstance(row["prompt"], list):
        return _messages(where, row["prompt"], "prompt")
    return [{"role": "user", "content": _text(where, row, "prompt")}]


def parse_sft_row(where: _Where, row: Any) -> SFTRow:
    """Validate one raw row (prompt/response or messages form) into an `SFTRow`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row must be a JSON object, got {type(row).__name__}")
    answer = _answer(where, row, required=False)
    if row.get("messages") is not None:
        if row.get("prompt") is not None or row.get("response") is not None:
            raise DataError(f"{where}: give either 'messages' or 'prompt'/'response', not both")
        messages = _messages(where, row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant turn")
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: the last message must be the assistant's trajectory, "
                f"got role {messages[-1]['role']!r}"
            )
        if len(messages) < 2:
            raise DataError(f"{where}: 'messages' has no prompt before the assistant turn")
        if not messages[-1]["content"].strip():
            raise DataError(f"{where}: the assistant message is empty")
        return SFTRow(messages[:-1], messages[-1]["content"], answer)
    return SFTRow(_prompt_messages(where, row), _text(where, row, "response"), answer)


def iter_sft_rows(path: str | Path) -> Iterator[SFTRow]:
    """Stream validated `SFTRow`s from a JSONL or Parquet file."""
    for where, row in iter_raw_rows(path):
        yield parse_sft_row(where, row)


def load_prompt_rows(path: str | Path) -> list[PromptRow]:
    """Read an RL prompt set: rows {prompt, answer, optional id, optional response}."""
    rows = []
    for where, row in iter_raw_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row must be a JSON object, got {type(row).__name__}")
        messages = _prompt_messages(where, row)
        answer = _answer(where, row, required=True)
        rid = row.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise DataError(f"{where}: field 'id' must be a string or an integer, got {type(rid).__name__}")
        response = _text(where, row, "response") if row.get("response") is not None else None
        rows.append(PromptRow(str(rid) if rid is not None else str(len(rows)), messages, answer, response))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# --- tokenizing -------------------------------------------------------------------------------------


def encode_prompts(
    messages: list[list[dict[str, str]]], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Token ids of each prompt with the chat template and the assistant generation prompt."""
    if not messages:
        return []
    if tokenizer.chat_template is None:
        raise DataError(
            "tokenizer has no chat template; set one or use a tokenizer dir that has chat_template"
        )
    texts = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encode_texts(texts, tokenizer)


def encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each text without added special tokens (the Rust backend directly when there is one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # skips transformers' per-encoding conversion, ~2x faster on 100K rows
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_rows(
    rows: Iterable[SFTRow], tokenizer: PreTrainedTokenizerBase, max_seq_len: int, overlong: str = "truncate"
) -> tuple[list[SFTSample], DatasetStats]:
    """Tokenize rows into samples (loss on the trajectory and its end-of-turn token only)."""
    samples, stats = [], DatasetStats()
    for chunk_samples, chunk_stats in iter_tokenized(rows, tokenizer, max_seq_len, overlong):
        samples.extend(chunk_samples)
        stats.merge(chunk_stats)
    return samples, stats


def iter_tokenized(
    rows: Iterable[SFTRow], tokenizer: PreTrainedTokenizerBase, max_seq_len: int, overlong: str = "truncate"
) -> Iterator[tuple[list[SFTSample], DatasetStats]]:
    """Streaming form of `tokenize_rows`: yields (samples, stats) per chunk of `CHUNK_ROWS` rows."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    eot = end_of_turn_id(tokenizer)
    chunk: list[SFTRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK_ROWS:
            yield _tokenize_chunk(chunk, tokenizer, eot, max_seq_len, overlong)
            chunk = []
    if chunk:
        yield _tokenize_chunk(chunk, tokenizer, eot, max_seq_len, overlong)


def _tokenize_chunk(
    rows: list[SFTRow], tokenizer: PreTrainedTokenizerBase, eot: int, max_seq_len: int, overlong: str
) -> tuple[list[SFTSample], DatasetStats]:
    prompts = encode_prompts([r.messages for r in rows], tokenizer)
    responses = encode_texts([r.response for r in rows], tokenizer)
    stats, samples = DatasetStats(num_rows=len(rows)), []
    unk = tokenizer.unk_token_id  # looked up once: the attribute is slow on HF tokenizers
    for p, r in zip(prompts, responses, strict=True):
        r = r + [eot]
        if unk is not None:
            stats.num_unk_tokens += p.count(unk) + r.count(unk)
        if len(p) + len(r) > max_seq_len:
            if overlong == "drop" or len(p) >= max_seq_len:
                stats.num_dropped += 1
                continue
            r = r[: max_seq_len - len(p)]
            stats.num_truncated += 1
        samples.append(SFTSample(p + r, [0] * len(p) + [1] * len(r)))
        stats.num_tokens += len(p) + len(r)
        stats.num_loss_tokens += len(r)
    return samples, stats


def load_sft_file(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, overlong: str = "truncate"
) -> tuple[list[SFTSample], DatasetStats]:
    """Read, validate and tokenize one SFT file; logs how many samples were truncated/dropped."""
    samples, stats = tokenize_rows(iter_sft_rows(path), tokenizer, max_seq_len, overlong)
    report_stats(path, stats, max_seq_len, overlong)
    return samples, stats


def report_stats(path: str | Path, stats: DatasetStats, max_seq_len: int, overlong: str) -> None:
    """Log truncated/dropped/unknown-token counts of one file; raise when it gave no sample."""
    if stats.num_rows == 0:
        raise DataError(f"{path}: no rows")
    if stats.num_truncated or stats.num_dropped:
        log.warning(
            "%s: %d of %d samples longer than max_seq_len=%d: %d truncated, %d dropped",
            path,
            stats.num_truncated + stats.num_dropped,
            stats.num_rows,
            max_seq_len,
            stats.num_truncated,
            stats.num_dropped,
        )
    if stats.num_unk_tokens:
        log.warning(
            "%s: %d characters/tokens mapped to the tokenizer's unknown token", path, stats.num_unk_tokens
        )
    if stats.num_samples == 0:
        raise DataError(
            f"{path}: all {stats.num_rows} rows are longer than max_seq_len={max_seq_len} "
            f"(overlong={overlong!r})"
        )
