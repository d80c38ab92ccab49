"""Your data as it is: the layouts practitioners' files have (LUFFY's openr1.parquet in verl's RL layout, MATH-500,
GSM8K, chat `messages`), key paths for any other, several files, globs and `datasets` save_to_disk directories;
multi-turn SFT trains every assistant turn and nothing else; errors name the file, the row, its keys and the fix."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data.files import expand_paths, iter_raw_rows
from engine.data.layouts import FieldMap, iter_sft_rows, load_prompt_rows
from engine.data.public_layouts import write_public_layouts
from engine.data.sft_dataset import load_sft_file, tokenize_rows
from engine.data.synthetic import SyntheticTaskConfig, generate_task
from engine.data.token_store import open_token_store, store_key
from engine.data.tokenizer import CHATML_TEMPLATE, build_char_tokenizer, load_tokenizer
from engine.errors import CeilingError, DataError

TASK = SyntheticTaskConfig(num_train=40, num_val=8, num_rl=16, num_eval=12, min_ops=2, max_ops=3, max_digits=1)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    return write_public_layouts(TASK, tmp_path_factory.mktemp("openr1"))


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_openr1_parquet_is_read_as_luffy_uses_it(public, tok):
    """verl's RL layout with LUFFY's `target`: SFT trains on the target, RL prompts carry the ground truth, the
    expert, the data source and extra_info, with no settings."""
    task = generate_task(TASK)
    rows = list(iter_sft_rows(public["train"]))
    assert [(r.messages[0]["content"], r.response, r.answer) for r in rows] == \
        [(t["prompt"], t["response"], t["answer"]) for t in task["train"]]
    prompts = load_prompt_rows(public["rl"])
    assert [(p.answer, p.response, p.data_source) for p in prompts] == \
        [(t["answer"], t["response"], f"synthetic-{t['num_ops']}op") for t in task["rl"]]
    assert prompts[3].extra_info == {"index": 3, "split": "rl"} and prompts[3].id == "3"
    # the same samples as the engine's own layout gives
    engine_rows = write_lines(public["train"].parent / "train.jsonl",
                              [{"prompt": t["prompt"], "response": t["response"]} for t in task["train"]])
    assert load_sft_file(public["train"], tok, 256)[0] == load_sft_file(engine_rows, tok, 256)[0]


def test_benchmark_layouts_need_no_settings(public, tmp_path):
    math500 = load_prompt_rows(public["eval"])
    assert len(math500) == 12 and math500[0].id == "synthetic/eval/0.json" and math500[0].response is None
    gsm8k = write_lines(tmp_path / "gsm8k.jsonl", [{"question": "2+3?", "answer": "2+3=5\n#### 5"}])
    (row,) = load_prompt_rows(gsm8k)
    assert row.answer == "5" and row.messages == [{"role": "user", "content": "2+3?"}]
    aime = write_lines(tmp_path / "aime.jsonl", [{"problem": "P", "answer": 204, "id": 7}])
    assert [(r.answer, r.id) for r in load_prompt_rows(aime)] == [("204", "7")]


def test_a_list_ground_truth_is_several_accepted_answers(tmp_path):
    from engine.reward import Reward

    path = write_lines(tmp_path / "verl.jsonl", [{"prompt": [{"role": "user", "content": "Q"}], "data_source": "s",
                                                  "reward_model": {"style": "rule", "ground_truth": ["72", "72.0"]}}])
    (row,) = load_prompt_rows(path)
    assert row.answer == ["72", "72.0"]
    scores, _ = Reward().score(["\\boxed{72}", "\\boxed{71}"], [row.answer] * 2)
    assert [s.reward for s in scores] == [1.0, 0.0]


def test_key_paths_map_any_other_layout(tmp_path, tok):
    rows = [{"q": {"text": "1+1?"}, "sol": [{"role": "assistant", "content": "\\boxed{2}"}], "gt": {"v": 2},
             "src": "mine"}]
    path = write_lines(tmp_path / "custom.jsonl", rows)
    with pytest.raises(DataError, match=r"custom\.jsonl:1: no known layout fits a row with keys \['gt', 'q', 'sol', "
                                        r"'src'\].*data\.fields\.prompt="):
        load_prompt_rows(path)
    fields = FieldMap(prompt="q.text", response="sol", answer="gt.v", data_source="src")
    (row,) = load_prompt_rows(path, fields)
    assert (row.messages[0]["content"], row.answer, row.response, row.data_source) == ("1+1?", "2", "\\boxed{2}", "mine")
    (sft,) = iter_sft_rows(path, fields)
    assert sft.response == "\\boxed{2}"
    with pytest.raises(DataError, match=r"missing field 'q\.missing'"):
        load_prompt_rows(path, FieldMap(prompt="q.missing", answer="gt.v"))
    with pytest.raises(ValueError, match="dotted key path"):
        FieldMap(prompt="a..b")


def test_globs_several_files_and_save_to_disk_directories(public, tmp_path, tok):
    import datasets  # the dev extra installs it (the engine itself reads save_to_disk with pyarrow)
    task = generate_task(TASK)
    ds = datasets.Dataset.from_parquet(str(public["rl"]))
    ds.save_to_disk(str(tmp_path / "rl_ds"))
    assert [p.suffix for p in expand_paths(tmp_path / "rl_ds")] == [".arrow"]
    from_disk = load_prompt_rows(tmp_path / "rl_ds")
    assert [(r.answer, r.response, r.data_source) for r in from_disk] == \
        [(r.answer, r.response, r.data_source) for r in load_prompt_rows(public["rl"])]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train', 'test'\]: name one"):
        expand_paths(tmp_path / "dd", "rl.prompts_path")
    assert len(load_prompt_rows(tmp_path / "dd" / "test")) == len(task["rl"])
    # a glob and a list: in order, every row once
    for i in range(3):
        pq.write_table(pa.Table.from_pylist([{"prompt": f"q{i}{j}", "response": "r"} for j in range(4)]),
                       tmp_path / f"part-{i}.parquet")
    assert [r.messages[0]["content"] for r in iter_sft_rows(str(tmp_path / "part-*.parquet"))] == \
        [f"q{i}{j}" for i in range(3) for j in range(4)]
    assert len(list(iter_sft_rows([str(tmp_path / "part-2.parquet"), str(tmp_path / "part-0.parquet")]))) == 8
    with pytest.raises(DataError, match="matches no file"):
        expand_paths(str(tmp_path / "nope-*.parquet"), "data.train_path")
    # the Arrow rows come with their locations, as Parquet's do
    where, _ = next(iter_raw_rows(expand_paths(tmp_path / "rl_ds")[0]))
    assert str(where).endswith(".arrow:row 0")


def test_save_to_disk_store_is_built_by_shards_as_by_one_process(public, tmp_path, tok):
    import datasets  # the dev extra installs it (the engine itself reads save_to_disk with pyarrow)
    datasets.Dataset.from_parquet(str(public["train"])).save_to_disk(str(tmp_path / "train_ds"), max_shard_size="4KB")
    files = expand_paths(tmp_path / "train_ds")
    assert len(files) > 1
    one = open_token_store(files, tok, 256, "truncate", tmp_path / "a", progress=False)
    two = open_token_store(files, tok, 256, "truncate", tmp_path / "b", progress=False, workers=2)
    assert len(one) == len(two) == TASK.num_train
    assert all((one.sample(i)[0] == two.sample(i)[0]).all() for i in range(len(one)))


def test_the_token_store_key_follows_the_mapping(public, tok):
    files = [public["train"]]
    keys = {store_key(files, tok, 256, "truncate", f) for f in
            (None, FieldMap(), FieldMap(response="target.0.content"), FieldMap(prompt="prompt.0.content"))}
    assert len(keys) == 3  # no mapping and an empty one are the same reading


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tok):
    """On token ids: the mask is 1 exactly on each assistant turn's tokens and its <|im_end|>, 0 on system, user
    and tool turns and on the template's markup, and the ids are the template's rendering of the conversation."""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "tool", "content": "T"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    from engine.data.layouts import SFTRow

    (sample,), _ = tokenize_rows([SFTRow(messages[:-1], "A2")], tok, 512)
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(sample.input_ids) == text.removesuffix("\n")  # the sample ends at the last <|im_end|>
    end = tok.convert_tokens_to_ids("<|im_end|>")
    spans = []  # (start, stop) token spans of the assistant contents + their <|im_end|>
    ids = sample.input_ids
    for content in ("A1", "A2"):
        marker = tok("<|im_start|>assistant\n" + content, add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(ids)) if ids[i:i + len(marker)] == marker) + len(marker) - len(content)
        spans.append((start, start + len(content) + 1))
    expected = [int(any(a <= i < b for a, b in spans)) for i in range(len(ids))]
    assert sample.loss_mask == expected
    assert [ids[b - 1] for _, b in spans] == [end, end]


def test_multi_turn_rows_from_files_and_what_cannot_be_trained(tmp_path, tok):
    chat = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]}
    tool = {"messages": [{"role": "user", "content": "Q"},
                         {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{}"}]},
                         {"role": "assistant", "content": "B"}]}
    reasoning = {"messages": [{"role": "user", "content": "Q"},
                              {"role": "assistant", "content": "B", "reasoning_content": "think"}]}
    samples, _ = load_sft_file(write_lines(tmp_path / "chat.jsonl", [chat]), tok, 256)
    assert tok.decode([i for i, m in zip(samples[0].input_ids, samples[0].loss_mask) if m]) == "A<|im_end|>B<|im_end|>"
    with pytest.raises(DataError, match=r"tool\.jsonl:1: messages\[1\] is a tool call"):
        load_sft_file(write_lines(tmp_path / "tool.jsonl", [tool]), tok, 256)
    with pytest.raises(DataError, match=r"r\.jsonl:1: messages\[1\] has \['reasoning_content'\], which the engine "
                                        "would drop"):
        load_sft_file(write_lines(tmp_path / "r.jsonl", [reasoning]), tok, 256)
    # a template that rewrites earlier turns once later ones follow cannot be trained turn by turn: said, by row
    odd = build_char_tokenizer()
    odd.chat_template = ("{%- for m in messages %}{%- if m['role'] == 'assistant' and not loop.last %}"
                         "{{- '<|im_start|>assistant\\n(earlier)<|im_end|>\\n' }}{%- else %}"
                         "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
                         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*rewrites earlier"):
        load_sft_file(tmp_path / "chat.jsonl", odd, 256)


def test_tokenizer_files_and_the_chat_template_setting(tmp_path):
    with pytest.raises(CeilingError, match=r"has no tokenizer files .*tokenizer\.json.*model\.tokenizer"):
        load_tokenizer(tmp_path)
    tok = build_char_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "base")
    bare = load_tokenizer(tmp_path / "base")
    assert bare.chat_template is None
    with pytest.raises(CeilingError, match="has no chat template.*model.chat_template"):
        tokenize_rows(list(iter_sft_rows(write_lines(tmp_path / "d.jsonl", [{"prompt": "Q", "response": "A"}]))),
                      bare, 64)
    assert load_tokenizer(tmp_path / "base", "chatml").chat_template == CHATML_TEMPLATE
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer(tmp_path / "base", str(tmp_path / "t.jinja")).chat_template == "{{ messages[0]['content'] }}"
    assert load_tokenizer("char", "{{ 'x' }}").chat_template == "{{ 'x' }}"
    with pytest.raises(CeilingError, match="neither a file, a Jinja template"):
        load_tokenizer("char", "no-such-template")
