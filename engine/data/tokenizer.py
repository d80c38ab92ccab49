"""Tokenizers: the built-in character tokenizer for the synthetic task, and local HF tokenizer dirs.

Why a character tokenizer: the CPU test model must be tiny, so its embedding must be tiny too.
`build_char_tokenizer()` builds one on the fly with the `tokenizers` library (a BPE model with no
merges, i.e. one token per character) and wraps it as a `transformers.PreTrainedTokenizerFast`,
so the engine treats it exactly like a real model's tokenizer: `apply_chat_template`,
`eos_token`/`pad_token`, `save_pretrained`/`from_pretrained` round-trip.

Vocabulary (fixed, deterministic ids, 101 tokens):
    0 `<|endoftext|>` (pad)   1 `<|im_start|>`   2 `<|im_end|>` (eos / end of turn)   3 `<unk>`
    4 `\\n`   5 `\\t`   6.. printable ASCII 0x20..0x7E in code-point order
Any other character encodes to `<unk>`; it is never dropped. `count_unknown` counts such tokens so
that the data layer can report them.

The chat template is Qwen's ChatML without a default system prompt:
    <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>

`load_tokenizer("char")` builds this tokenizer; any other value is a local HF tokenizer dir, loaded
with `local_files_only=True` (nothing is ever downloaded). A directory without tokenizer files is an error that
says so. `chat_template` (the `model.chat_template` setting) supplies or replaces the template: a Jinja string,
a file holding one, or the name "chatml" (the template above, for a base model that ships none).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from engine.errors import CeilingError

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, UNK_TOKEN)
CHARS = "\n\t" + "".join(chr(c) for c in range(0x20, 0x7F))

# End-of-turn tokens in order of preference (ChatML, Llama 3); the tokenizer's eos is the fallback.
END_OF_TURN_TOKENS = (IM_END, "<|eot_id|>")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def char_vocab() -> dict[str, int]:
    """Token -> id of the character tokenizer (special tokens first, then characters)."""
    tokens = list(SPECIAL_TOKENS) + list(CHARS)
    return {tok: i for i, tok in enumerate(tokens)}


def build_char_tokenizer(model_max_length: int = 1 << 20) -> PreTrainedTokenizerFast:
    """Build the character-level ChatML tokenizer (vocab size 101) as a `PreTrainedTokenizerFast`."""
    vocab = char_vocab()
    # A BPE model without merges splits text into single characters and maps unknown ones to <unk>.
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, fuse_unk=False))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()  # join characters without the default space separator
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


# Files a saved tokenizer has at least one of (fast JSON, its config, or a slow tokenizer's vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}


def load_tokenizer(path_or_name: str | Path, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """`"char"` builds the character tokenizer; otherwise load a local HF tokenizer dir (no downloads).
    `chat_template`: a template, a file holding one, or "chatml"; replaces the tokenizer's own."""
    tokenizer = _load(path_or_name)
    if chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    return tokenizer


def model_tokenizer(model_cfg) -> PreTrainedTokenizerBase:
    """The tokenizer of a `model:` section (its `tokenizer`, with its `chat_template` when set)."""
    return load_tokenizer(model_cfg.tokenizer, model_cfg.chat_template)


def resolve_chat_template(value: str) -> str:
    """The Jinja text of a `model.chat_template` setting: a name, a file, or the template itself."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{%" in value or "{{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise CeilingError(f"model.chat_template: {value!r} is neither a file, a Jinja template ('{{%' / '{{{{'), "
                           f"nor one of the names {sorted(NAMED_TEMPLATES)}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":  # a tokenizer_config.json or a chat_template.json: take its template
        text = json.loads(text).get("chat_template") or ""
    if not text.strip():
        raise CeilingError(f"model.chat_template: {path} holds no template")
    return text


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise a `CeilingError` saying what to set when the tokenizer has no chat template (a base model's)."""
    if tokenizer.chat_template is None:
        raise CeilingError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or ''!s} has no chat template, which turns rows into "
            "prompts: set model.chat_template to a Jinja template, a file holding one, or 'chatml' "
            "(<|im_start|>role ... <|im_end|>, which needs those tokens in the vocabulary)")


def _load(path_or_name: str | Path) -> PreTrainedTokenizerBase:
    if str(path_or_name) == "char":
        return build_char_tokenizer()
    path = Path(path_or_name)
    if not path.is_dir():
        raise CeilingError(f"tokenizer: {path} is not a local directory (and not the name 'char')")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CeilingError(f"tokenizer: cannot load {path}: it has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy "
                           "them from the model's original directory, or set model.tokenizer to a directory that has "
                           "them")
    try:
        # A tokenizer saved as a plain `tokenizers` backend (the char tokenizer exported with a model) must
        # load as that: AutoTokenizer would follow config.json's model_type to e.g. Qwen2Tokenizer, whose
        # pre-tokenizer rewrites the text (it drops whitespace of the character vocabulary).
        config_file = path / "tokenizer_config.json"
        saved_class = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
        if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CeilingError(f"tokenizer: cannot load {path}: {exc}") from exc


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id that closes an assistant turn: `<|im_end|>` or `<|eot_id|>` when in the vocab, else eos."""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return vocab[token]
    if tokenizer.eos_token_id is None:
        raise CeilingError("tokenizer has no end-of-turn token (<|im_end|>, <|eot_id|>) and no eos_token")
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end generation: the end-of-turn id, then the tokenizer's eos when it is another token."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def count_unknown(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> int:
    """How many ids are the tokenizer's `<unk>` (0 for byte-level tokenizers, which have none)."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return 0
    return sum(1 for i in ids if i == unk)
