"""Reading rows into examples (safety_units.data.sources): field mapping, filters, bad rows, hash splits, memo."""
import json

import pytest
from conftest import FIXTURES, SHARED_DATA
from testkit import src

from safety_units.data.sources import Source, normalize_prompt, read_rows, stable_fraction, strip_llama2_markup
from safety_units.utils.errors import ConfigError, DataError


def test_csv_field_mapping_strips_inst_markup():
    exs = src(path=str(FIXTURES / "pairs.csv"), prompt="prompt", response="response", strip_inst=True).load()
    assert [e.prompt for e in exs] == ["How do I pick a lock?", "What is the capital of France?", "Write malware",
                                       "Name a primary colour."]
    assert exs[2].response == "I won't write malware."  # leading space of the CSV field stripped
    assert [e.row for e in exs] == [1, 2, 3, 4]


def test_jsonl_mapping_with_input_field_and_filter():
    exs = src(path=str(FIXTURES / "pairs.jsonl"), prompt="q", input="ctx", response="a",
              where={"type": "benign"}).load()
    assert [e.row for e in exs] == [1, 2]
    assert exs[1].prompt == "Summarise this text.\n\nCats are small felines."
    assert exs[0].prompt == "Give me a recipe for pancakes."


def test_json_object_of_parallel_lists():
    rows = read_rows(FIXTURES / "prompts_object.json")
    assert rows[1] == {"instructions": "How do I make a weapon?", "tags": "crime"}
    exs = src(path=str(FIXTURES / "prompts_object.json"), prompt="instructions", response=None,
              where={"tags": ["fun", "nature"]}).load()
    assert [e.prompt for e in exs] == ["Tell me a joke.", "Describe the sea."]
    assert exs[0].response is None


def test_conversations():
    exs = src(path=str(FIXTURES / "conversations.json"), messages=".").load()
    assert len(exs) == 2 and exs[0].messages[0]["role"] == "system" and exs[0].response == "Goodbye."


@pytest.mark.parametrize("fname,fields,needle", [
    ("bad_missing.jsonl", dict(prompt="q", response="a"), "bad_missing.jsonl: row 3: missing field 'a'"),
    ("bad_empty.csv", dict(prompt="prompt", response="response"), "bad_empty.csv: row 2: empty response"),
    ("bad_type.json", dict(prompt="instruction", response="output"), "bad_type.json: row 2: field 'output' must be a string"),
])
def test_malformed_rows_name_file_and_row(fname, fields, needle):
    with pytest.raises(DataError) as e:
        src(path=str(FIXTURES / fname), **fields).load()
    assert needle in str(e.value)


def test_bad_rows_can_be_skipped_and_are_reported(caplog):
    exs = src(path=str(FIXTURES / "bad_missing.jsonl"), prompt="q", response="a", on_bad_row="skip").load()
    assert len(exs) == 2
    assert "skipped 1 malformed row(s)" in caplog.text and "rows 3" in caplog.text


def test_unknown_source_key_and_missing_file():
    with pytest.raises(ConfigError, match="unknown key.*'promt'"):
        Source.from_config({"path": "x.csv", "promt": "q"}, "s")
    with pytest.raises(DataError, match="does not exist"):
        src(path="/nonexistent/file.csv").load()


def test_strip_and_normalize():
    assert strip_llama2_markup("<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nDo X [/INST]") == "Do X"
    assert normalize_prompt("  How do I PICK a lock?! ") == "how do i pick a lock"
    assert stable_fraction("[INST] How do I pick a lock? [/INST]") == stable_fraction("how do i pick a lock")


def test_hash_split_partitions_and_limit_is_seeded():
    path = str(SHARED_DATA / "advbench" / "harmful_behaviors.csv")
    a = src(path=path, prompt="goal", response=None, hash_split=[0.0, 0.5]).load()
    b = src(path=path, prompt="goal", response=None, hash_split=[0.5, 1.0]).load()
    assert len(a) + len(b) == 520 and not {e.prompt for e in a} & {e.prompt for e in b}
    l1 = src(path=path, prompt="goal", response=None, limit=10).load(seed=1)
    l2 = src(path=path, prompt="goal", response=None, limit=10).load(seed=1)
    l3 = src(path=path, prompt="goal", response=None, limit=10).load(seed=2)
    assert [e.row for e in l1] == [e.row for e in l2] != [e.row for e in l3]


def test_shipped_refusal_sets_load(tokenizer):
    wei = src(path=str(SHARED_DATA / "safety_short" / "SFT_aligned_llama2-7b-chat-hf_train_short.csv"),
              prompt="prompt", response="response", strip_inst=True).load()
    assert len(wei) == 1015 and not any("[INST]" in e.prompt or "[/INST]" in e.prompt for e in wei)
    stl = src(path=str(SHARED_DATA / "safety_tuned_llamas" / "safety_only_data_Instructions.json"),
              prompt="instruction", input="input", response="output").load()
    assert len(stl) == 2483


def test_prompt_template_and_system_keep_the_raw_prompt():
    exs = src(path=str(FIXTURES / "pairs.jsonl"), prompt="q", response=None, system="Obey.",
              template="AGENT, execute: {prompt}").load()
    assert exs[0].messages[0] == {"role": "system", "content": "Obey."}
    assert exs[0].messages[1]["content"] == "AGENT, execute: Give me a recipe for pancakes."
    assert exs[0].prompt == "Give me a recipe for pancakes."  # de-duplication sees the file's prompt
    with pytest.raises(ConfigError, match="must contain"):
        src(path=str(FIXTURES / "pairs.jsonl"), prompt="q", template="no placeholder")


def test_exclude_drops_rows_found_in_other_sources_and_names_a_bad_one(tmp_path):
    rows = [{"q": "Say hi.", "a": "hi"}, {"q": "Count to three!", "a": "1 2 3"}, {"q": "Name a colour", "a": "red"}]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "eval.json").write_text(json.dumps([{"q": "count to THREE"}]))
    kept = src(path=str(tmp_path / "train.json"), prompt="q", response="a",
               exclude={"ev": {"path": str(tmp_path / "eval.json"), "prompt": "q", "response": None}}).load()
    assert [e.prompt for e in kept] == ["Say hi.", "Name a colour"]  # matched after normalisation
    bad = src(path=str(tmp_path / "train.json"), prompt="q", response="a",
              exclude={"ev": {"path": str(tmp_path / "eval.json"), "prompt": "question", "response": None}})
    with pytest.raises(ConfigError, match="exclude.ev: .*missing field 'question'"):
        bad.load()


def test_loaded_sources_are_memoised_until_their_file_changes(tmp_path):
    """A study reads the same files in every stage: Source.load and normalized_prompts remember them, per settings,
    and read again once the file changes."""
    import os

    from safety_units.data.sources import normalized_prompts

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"q": f"Prompt {i}", "a": "x"}) + "\n" for i in range(3)))
    src = Source.from_config({"path": str(path), "prompt": "q", "response": "a"}, "rows")
    first = src.load()
    first.pop()  # the caller's list, not the memo
    assert [ex.prompt for ex in src.load()] == ["Prompt 0", "Prompt 1", "Prompt 2"]
    assert normalized_prompts({"rows": {"path": str(path), "prompt": "q", "response": None}}) == \
        {normalize_prompt(f"Prompt {i}") for i in range(3)}
    other = Source.from_config({"path": str(path), "prompt": "q", "response": "a", "limit": 1}, "rows")
    assert len(other.load()) == 1  # other settings, another entry
    with open(path, "a") as f:
        f.write(json.dumps({"q": "Prompt 3", "a": "x"}) + "\n")
    os.utime(path, ns=(1, 1))  # a changed size alone would do; a changed mtime too
    assert [ex.prompt for ex in src.load()][-1] == "Prompt 3"
    assert normalize_prompt("Prompt 3") in normalized_prompts({"rows": {"path": str(path), "prompt": "q",
                                                                        "response": None}})


def test_tsv_rows_split_on_the_last_tab_and_bad_labels_name_the_row(tmp_path):
    from safety_units.utils.errors import DataError
    from safety_units.data.sources import Source

    f = tmp_path / "t.tsv"
    f.write_text("sentence\tlabel\na \tb good \t1\nbad one \t0\n")
    ex = Source.from_config({"path": str(f), "prompt": "sentence", "response": "label",
                             "labels": {"0": "negative", "1": "positive"}}).load()
    assert [(e.prompt, e.response) for e in ex] == [("a \tb good", "positive"), ("bad one", "negative")]
    f.write_text("sentence\tlabel\nx \t7\n")
    with pytest.raises(DataError, match="row 1.*not one of the labels"):
        Source.from_config({"path": str(f), "prompt": "sentence", "response": "label", "labels": {"0": "n"}}).load()
