"""Row layouts: what a row of a practitioner's file means, recognised from its keys, or mapped by key paths.

    row = parse_sft_row(where, raw)                      # SFTRow: the conversation, every assistant turn trained
    rows = load_prompt_rows("data/openr1.parquet")      # PromptRow: prompt, reference answer, expert, source

Recognised with no settings, in this order (extra keys are ignored):

    chat        `messages`: [{role, content}, ...]; SFT trains every assistant turn; RL prompts with the messages
                before the last assistant turn, whose content is the expert trajectory.
    verl        verl's RL layout: `prompt` as chat messages, `reward_model: {style, ground_truth}`,
                `data_source`, `extra_info`; LUFFY's and UPT's `openr1.parquet` add `target`, a list holding
                the expert's assistant message, which is SFT's trajectory and LUFFY/SRFT/UPT's expert. A list
                `ground_truth` is several accepted answers (math-verify takes any of them).
    engine      `prompt` (text or chat messages), `response` (the expert trajectory), `answer`, `id`.
    benchmark   MATH-500's and GSM8K's: `problem` or `question`, `answer` (GSM8K's "... #### 72" gives "72"),
                `solution` (the trajectory, if SFT trains on it), `unique_id` or `id`.

`data_source` and `extra_info` are read from the top level of every layout, where a row has them. Any other
layout: `data.fields` gives a dotted key path per field (`question.text`, `target.0.content`); a mapped field
is read from its path and the others as the recognised layout has them. A row that fits no layout is an error
naming the file, the row, the keys it has and the settings that would map them. Nothing is silently dropped:
a message the engine cannot train (an assistant tool call, or a key such as `reasoning_content` with a value)
is an error naming the row.

No torch here: the config (engine/config/sections.py) imports `FieldMap`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.data.files import _Where, expand_paths, iter_files_rows
from engine.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "name")  # `name` is context some templates render; others must be empty
LAYOUT_VERSION = 2  # bump when recognition or conversion changes what a row means (it is in the token store key)


@dataclass
class FieldMap:
    """Where each field of a row is, as a dotted key path (`reward_model.ground_truth`, `target.0.content`);
    an unset field is read as the recognised layout has it (engine/data/layouts.py)."""

    prompt: str | None = None
    """The prompt: a string (one user message) or a list of chat messages."""
    response: str | None = None
    """The expert trajectory: a string, or a list holding the assistant message (LUFFY's `target`)."""
    messages: str | None = None
    """A whole chat, [{role, content}, ...]: SFT trains every assistant turn."""
    answer: str | None = None
    """The reference answer the reward checks (a string, a number, or a list of accepted answers)."""
    data_source: str | None = None
    """Where the row comes from; metrics are split by it."""
    extra_info: str | None = None
    """Anything else a custom reward function wants (verl's `extra_info`)."""
    id: str | None = None
    """A row id (default: the row's position)."""

    def __post_init__(self):
        for f in fields(self):
            path = getattr(self, f.name)
            if path is not None and (not isinstance(path, str) or not all(path.split("."))):
                raise ValueError(f"data.fields.{f.name} must be a dotted key path such as 'a.b.0', got {path!r}")
        if self.messages is not None and (self.prompt is not None or self.response is not None):
            raise ValueError("data.fields: map either `messages` or `prompt`/`response`, not both")

    def mapped(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def key(self) -> str:
        """What the token store's key takes from the mapping (a changed mapping is a new store)."""
        return json.dumps({"layout_version": LAYOUT_VERSION, **self.mapped()}, sort_keys=True)


@dataclass
class SFTRow:
    """One validated SFT row: the conversation before the final trajectory (earlier assistant turns included, all
    trained), the final trajectory, and the reference answer (or None)."""

    messages: list[dict[str, str]]
    response: str
    answer: str | None = None
    where: str = field(default="", compare=False)
    """The row's file and line, for errors found later (tokenizing)."""


@dataclass
class PromptRow:
    """One RL or evaluation prompt."""

    id: str
    messages: list[dict[str, str]]
    answer: str | list[str]
    response: str | None = None
    """The expert trajectory (LUFFY/SRFT/UPT), if the row has one."""
    data_source: str | None = None
    extra_info: Any = None


# ---------------------------------------------------------------- recognising a layout


def _layout(row: dict) -> tuple[str, dict[str, str]] | None:
    """(layout name, field -> key path) of a row, from its keys; None when no layout fits."""
    common = {"data_source": "data_source", "extra_info": "extra_info"}
    if "messages" in row:
        answer = "reward_model.ground_truth" if isinstance(row.get("reward_model"), dict) else "answer"
        return "chat", {**common, "messages": "messages", "answer": answer, "id": "id"}
    if isinstance(row.get("reward_model"), dict):
        return "verl", {**common, "prompt": "prompt", "response": "target", "answer": "reward_model.ground_truth",
                        "id": "id" if "id" in row else "extra_info.index"}
    if "prompt" in row or "response" in row:
        return "engine", {**common, "prompt": "prompt", "response": "response", "answer": "answer", "id": "id"}
    for key in ("problem", "question"):
        if key in row:
            return "benchmark", {**common, "prompt": key, "response": "solution", "answer": "answer",
                                 "id": "unique_id" if "unique_id" in row else "id"}
    return None


def _paths(where: _Where, row: Any, fields_: FieldMap | None) -> tuple[str, dict[str, str]]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: row must be a JSON object, got {type(row).__name__}")
    found = _layout(row)
    mapped = fields_.mapped() if fields_ is not None else {}
    if found is None and not ({"prompt", "messages"} & set(mapped)):
        raise DataError(
            f"{where}: no known layout fits a row with keys {sorted(row)}: the engine reads `messages` (chat), "
            "`prompt` + `reward_model` (verl), `prompt` + `response` (its own), or `problem`/`question` + `answer` "
            "(benchmarks); map yours with data.fields, e.g. --set data.fields.prompt=question.text "
            "--set data.fields.answer=label (dotted key paths; engine/data/layouts.py)")
    name, paths = found or ("mapped", {"data_source": "data_source", "extra_info": "extra_info"})
    if "messages" in mapped:
        paths = {k: v for k, v in paths.items() if k not in ("prompt", "response")}
    elif "prompt" in mapped or "response" in mapped:
        paths.pop("messages", None)
    return (name if not mapped else f"{name}+data.fields"), {**paths, **mapped}


def get_path(row: Any, path: str) -> Any:
    """The value at a dotted key path (`a.b.0.c`: dict keys, list indices); None where it stops."""
    value = row
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list | tuple) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return None
        if value is None:
            return None
    return value


# ---------------------------------------------------------------- checking values


def _unicode(where: _Where, key: str, value: str) -> str:
    """`value`, if it can be encoded (JSON's `\\ud800` escapes decode to lone surrogates, which tokenizers reject)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: field {key!r} is not valid Unicode: a lone surrogate "
                        f"{value[exc.start]!r} at character {exc.start}") from None
    return value


def _text(where: _Where, value: Any, key: str) -> str:
    if value is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return _unicode(where, key, value)


def _answer(where: _Where, value: Any, key: str, required: bool, allow_list: bool) -> str | list[str] | None:
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    if allow_list and isinstance(value, list | tuple) and value:
        return [_answer(where, v, f"{key}[{i}]", True, False) for i, v in enumerate(value)]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: field {key!r} must be a string or a number, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return _unicode(where, key, value)


def _messages(where: _Where, value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list | tuple) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role must be one of {ROLES}, got {role!r}")
        if msg.get("tool_calls") or msg.get("function_call"):
            raise DataError(f"{where}: {key}[{i}] is a tool call, which SFT cannot train as text: remove the row, "
                            "or render the calls into the content")
        extra = sorted(k for k, v in msg.items() if k not in MESSAGE_KEYS and v not in (None, "", [], {}))
        if extra:
            raise DataError(f"{where}: {key}[{i}] has {extra}, which the engine would drop: move it into the "
                            "content, or remove it")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": _unicode(where, f"{key}[{i}].content", content)})
    return out


def _prompt(where: _Where, value: Any, key: str) -> list[dict[str, str]]:
    if isinstance(value, list | tuple):
        return _messages(where, value, key)
    return [{"role": "user", "content": _text(where, value, key)}]


def _trajectory(where: _Where, value: Any, key: str) -> str:
    """The expert's text: a string, an assistant message, or a list holding one (LUFFY's `target`)."""
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        (msg,) = _messages(where, [value], key)
        if msg["role"] != "assistant":
            raise DataError(f"{where}: {key} must hold the assistant's message, got role {msg['role']!r}")
        value = msg["content"]
    elif isinstance(value, list | tuple):
        raise DataError(f"{where}: field {key!r} must be the expert's text or a list holding its one assistant "
                        f"message, got a list of {len(value)}")
    return _text(where, value, key)


def _chat(where: _Where, value: Any, key: str) -> tuple[list[dict[str, str]], str]:
    """(messages before the final assistant turn, its content) of a whole chat."""
    messages = _messages(where, value, key)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: '{key}' has no assistant turn")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's trajectory, got role "
                        f"{messages[-1]['role']!r}")
    if messages[0]["role"] == "assistant" or len(messages) < 2:
        raise DataError(f"{where}: '{key}' has no prompt before the first assistant turn")
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: the assistant message is empty")
    return messages[:-1], messages[-1]["content"]


def _id(value: Any, position: int) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, str | int):
        return str(position)
    return str(value)


# ---------------------------------------------------------------- rows


def parse_sft_row(where: _Where, row: Any, fields_: FieldMap | None = None) -> SFTRow:
    """One raw row as an `SFTRow` (a conversation with a trajectory to train on)."""
    name, paths = _paths(where, row, fields_)
    answer = _answer(where, get_path(row, paths["answer"]), paths["answer"], False, paths["answer"] != "answer") \
        if "answer" in paths else None
    if isinstance(answer, list):
        answer = answer[0]  # SFT keeps the answer for the record only
    if "messages" in paths and get_path(row, paths["messages"]) is not None:
        if name == "chat" and (row.get("prompt") is not None or row.get("response") is not None):
            raise DataError(f"{where}: give either 'messages' or 'prompt'/'response', not both")
        messages, response = _chat(where, get_path(row, paths["messages"]), paths["messages"])
        return SFTRow(messages, response, answer, str(where))
    if "messages" in paths and "prompt" not in paths:
        raise DataError(f"{where}: missing field {paths['messages']!r}")
    prompt = get_path(row, paths["prompt"]) if "prompt" in paths else None
    if prompt is None:
        raise DataError(f"{where}: missing field {paths.get('prompt', 'prompt')!r}")
    response = get_path(row, paths["response"]) if "response" in paths else None
    if response is None:
        hint = " (LUFFY's openr1 layout has it in `target`; map yours with data.fields.response)" \
            if name.startswith("verl") else ""
        raise DataError(f"{where}: missing field {paths.get('response', 'response')!r}: SFT needs the expert "
                        f"trajectory{hint}")
    return SFTRow(_prompt(where, prompt, paths["prompt"]), _trajectory(where, response, paths["response"]), answer,
                  str(where))


def parse_prompt_row(where: _Where, row: Any, fields_: FieldMap | None, position: int) -> PromptRow:
    """One raw row as a `PromptRow` (prompt and reference answer; the expert trajectory when the row has one)."""
    name, paths = _paths(where, row, fields_)
    answer = _answer(where, get_path(row, paths["answer"]) if "answer" in paths else None,
                     paths.get("answer", "answer"), True, paths.get("answer", "answer") != "answer")
    if isinstance(answer, str) and name.startswith("benchmark") and "####" in answer:
        answer = _text(where, answer.rsplit("####", 1)[1].strip(), paths["answer"] + " after ####")
    response = None
    if "messages" in paths and get_path(row, paths["messages"]) is not None:
        messages = _messages(where, get_path(row, paths["messages"]), paths["messages"])
        if messages[-1]["role"] == "assistant":
            messages, response = messages[:-1], _text(where, messages[-1]["content"], "the last assistant message")
        if not messages:
            raise DataError(f"{where}: '{paths['messages']}' has no prompt before its assistant turn")
    else:
        prompt = get_path(row, paths["prompt"]) if "prompt" in paths else None
        if prompt is None:
            raise DataError(f"{where}: missing field {paths.get('prompt', 'prompt')!r}")
        messages = _prompt(where, prompt, paths["prompt"])
        value = get_path(row, paths["response"]) if "response" in paths else None
        if name.startswith("benchmark") and isinstance(value, str) and not value.strip():
            value = None  # a benchmark's empty solution: no trajectory, not a bad row
        response = _trajectory(where, value, paths["response"]) if value is not None else None
    source = get_path(row, paths["data_source"])
    if source is not None and not isinstance(source, str):
        raise DataError(f"{where}: field {paths['data_source']!r} must be a string, got {type(source).__name__}")
    extra = get_path(row, paths["extra_info"])
    return PromptRow(_id(get_path(row, paths["id"]) if "id" in paths else None, position), messages, answer,
                     response, source, extra)


def iter_sft_rows(paths: str | Path | Sequence[str | Path], fields_: FieldMap | None = None) -> Iterator[SFTRow]:
    """Stream validated `SFTRow`s from the files a path setting names."""
    for where, row in iter_files_rows(expand_paths(paths)):
        yield parse_sft_row(where, row, fields_)


def load_prompt_rows(paths: str | Path | Sequence[str | Path], fields_: FieldMap | None = None,
                     setting: str = "path") -> list[PromptRow]:
    """An RL prompt set or a benchmark, from the files a path setting names."""
    files = expand_paths(paths, setting)
    rows = [parse_prompt_row(where, row, fields_, i) for i, (where, row) in enumerate(iter_files_rows(files))]
    if not rows:
        raise DataError(f"{', '.join(map(str, files))}: no rows")
    return rows
