"""The character tokenizer: fixed ids, ChatML template, unknown characters, save/load round-trip."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.data.synthetic import SyntheticTaskConfig, generate_task
from engine.data.tokenizer import (
    CHATML_TEMPLATE,
    build_char_tokenizer,
    char_vocab,
    count_unknown,
    end_of_turn_id,
    load_tokenizer,
)
from engine.errors import CeilingError


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_vocab_is_small_and_fixed(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 101 == len(char_vocab())
    assert tok.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n", " ", "~"]
    ) == [0, 1, 2, 3, 4, 6, 100]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == ("<|im_end|>", 2, 0, 3)
    assert end_of_turn_id(tok) == 2


def test_one_token_per_character_and_exact_decode(tok):
    text = "Tom has 23 apples, buys 15 more.\n23+15=38. \\boxed{38}\t~"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    # Special tokens in the text are single tokens.
    assert tok("<|im_start|>a<|im_end|>", add_special_tokens=False)["input_ids"] == [1, 71, 2]


def test_every_synthetic_row_encodes_without_unknowns(tok):
    task = generate_task(
        SyntheticTaskConfig(num_train=200, num_val=0, num_rl=0, num_eval=0, operations=("+", "-", "*"))
    )
    for row in task["train"]:
        ids = tok(row["prompt"] + row["response"], add_special_tokens=False)["input_ids"]
        assert count_unknown(tok, ids) == 0


def test_unknown_characters_map_to_unk_and_are_counted(tok):
    ids = tok("café – ok", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("café – ok")  # nothing is dropped
    assert count_unknown(tok, ids) == 2
    assert tok.decode(ids) == "caf<unk> <unk> ok"


def test_chat_template(tok):
    assert tok.chat_template == CHATML_TEMPLATE
    msgs = [{"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "4"}], tokenize=False)
    assert full == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    with_system = tok.apply_chat_template([{"role": "system", "content": "S"}] + msgs, tokenize=False)
    assert with_system.startswith("<|im_start|>system\nS<|im_end|>\n")


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)):
        assert len(loaded) == len(tok)
        assert loaded.get_vocab() == tok.get_vocab()
        assert (loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
            "<|im_end|>",
            "<|endoftext|>",
            "<unk>",
        )
        assert loaded.chat_template == tok.chat_template
        text = "x=1é<|im_end|>"
        assert (
            loaded(text, add_special_tokens=False)["input_ids"]
            == tok(text, add_special_tokens=False)["input_ids"]
        )


def test_load_tokenizer_names(tmp_path):
    assert len(load_tokenizer("char")) == 101
    with pytest.raises(CeilingError, match="not a local directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(CeilingError, match="cannot load"):
        load_tokenizer(tmp_path)  # an empty dir holds no tokenizer
