import json

import pytest
from conftest import FIXTURES, SHARED_DATA

from safety_units.data.chat import IGNORE_INDEX, collate, encode_example, prompt_text
from safety_units.data.datamodule import SFTDataModule
from safety_units.utils.errors import ConfigError, DataError
from safety_units.data.sources import Source, normalize_prompt, read_rows, stable_fraction, strip_llama2_markup


def src(**kw):
    return Source.from_config(kw, kw.pop("name", "test") if "name" in kw else "test")


# ----------------------------------------------------------------------------- reading and field mapping
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


# ----------------------------------------------------------------------------- templating and labels
def test_labels_cover_exactly_the_response(tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    enc = encode_example(tokenizer, msgs, max_length=512)
    n_prompt = len(tokenizer(prompt_text(tokenizer, msgs), add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert tokenizer.decode(enc.input_ids[n_prompt:]) == "It is 4.<|im_end|>\n"
    assert tokenizer.decode(enc.input_ids).startswith("<|im_start|>system\n")


def test_multi_turn_labels_cover_every_assistant_turn(tokenizer):
    exs = src(path=str(FIXTURES / "conversations.json"), messages=".").load()
    enc = encode_example(tokenizer, exs[0].messages, max_length=512)
    spans, cur = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            cur.append(tok)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    if cur:
        spans.append(tokenizer.decode(cur))
    assert spans == ["Hello.<|im_end|>\n", "Goodbye.<|im_end|>\n"]


def test_truncation_keeps_response_tokens(tokenizer):
    long_prompt = "word " * 300
    msgs = [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "short answer " * 20}]
    enc = encode_example(tokenizer, msgs, max_length=64, min_response_tokens=16)
    assert len(enc.input_ids) == 64 and enc.truncated_prompt and enc.truncated_response
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == 16
    enc2 = encode_example(tokenizer, [msgs[0] | {"content": "hi"}, msgs[1]], max_length=48)
    assert not enc2.truncated_prompt and enc2.truncated_response and len(enc2.input_ids) == 48


def test_collate_pads_right_with_ignored_labels(tokenizer):
    a = encode_example(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 64)
    b = encode_example(tokenizer, [{"role": "user", "content": "longer prompt here"},
                                   {"role": "assistant", "content": "and a longer answer too"}], 64)
    batch = collate([a, b], tokenizer.pad_token_id)
    n = len(a.input_ids)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


# ----------------------------------------------------------------------------- the datamodule
def test_datamodule_mix_split_and_determinism(tokenizer):
    sources = {"safety": {"path": str(FIXTURES / "pairs.csv"), "prompt": "prompt", "response": "response",
                          "strip_inst": True, "where": {"type": "harmful"}, "weight": 1},
               "benign": {"path": str(FIXTURES / "pairs.jsonl"), "prompt": "q", "response": "a", "weight": 1}}
    dm = SFTDataModule(tokenizer, sources, num_samples=4, val_fraction=0.5, max_length=128, seed=3).prepare()
    assert dm.stats["sources"] == {"safety": 2, "benign": 2}
    assert len(dm.train_set) == 2 and len(dm.val_set) == 2
    dm2 = SFTDataModule(tokenizer, sources, num_samples=4, val_fraction=0.5, max_length=128, seed=3).prepare()
    assert [e.prompt for e in dm.train_examples] == [e.prompt for e in dm2.train_examples]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_prompt_only_source_needs_responses(tokenizer):
    sources = {"p": {"path": str(FIXTURES / "prompts_object.json"), "prompt": "instructions", "response": None}}
    with pytest.raises(ConfigError, match="self_distill: true"):
        SFTDataModule(tokenizer, sources).prepare()


def test_self_distill_generates_once_and_caches(tiny, tmp_path):
    sources = {"p": {"path": str(FIXTURES / "prompts_object.json"), "prompt": "instructions", "response": None,
                     "self_distill": True}}
    dm = SFTDataModule(tiny.tokenizer, sources, val_fraction=0.0, cache_dir=str(tmp_path),
                       self_distill={"max_new_tokens": 6, "batch_size": 2}).prepare(tiny.model)
    files = list((tmp_path / "self_distill").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 3
    assert all(e.response for e in dm.train_examples)
    files[0].write_text(files[0].read_text().replace('"response": "', '"response": "CACHED '))
    dm2 = SFTDataModule(tiny.tokenizer, sources, val_fraction=0.0, cache_dir=str(tmp_path),
                        self_distill={"max_new_tokens": 6, "batch_size": 2}).prepare(tiny.model)
    assert all(e.response.startswith("CACHED") for e in dm2.train_examples)


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


def test_a_teacher_answers_the_prompt_only_sources(tiny, tmp_path):
    """data.self_distill.teacher: another model (e.g. the shipped, compliant one) writes the responses."""
    from omegaconf import OmegaConf

    from safety_units.data.generation import generate
    from safety_units.models.loading import build_tiny
    from safety_units.utils.fingerprints import fingerprint_key, model_fingerprint

    sources = {"p": {"path": str(FIXTURES / "prompts_object.json"), "prompt": "instructions", "response": None,
                     "self_distill": True}}
    teacher_cfg = OmegaConf.create({"_target_": "safety_units.models.loading.build_tiny", "cache_dir": str(tmp_path),
                                    "seed": 1})
    SFTDataModule(tiny.tokenizer, sources, val_fraction=0.0, cache_dir=str(tmp_path),
                  self_distill={"max_new_tokens": 6, "batch_size": 2, "teacher": teacher_cfg}).prepare(tiny.model)
    teacher = build_tiny(cache_dir=str(tmp_path), seed=1).model
    [cached] = (tmp_path / "self_distill").glob("*.jsonl")
    assert cached.name.startswith(fingerprint_key(model_fingerprint(teacher)))  # keyed by the teacher, not the student
    rows = [json.loads(line) for line in cached.read_text().splitlines()]
    assert len(rows) == 3
    prompts = [r["prompt"] for r in rows]
    assert [r["response"] for r in rows] == generate(teacher, tiny.tokenizer, prompts, max_new_tokens=6)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2])
def test_harmful_mixture_never_contains_an_eval_prompt(p):
    from conftest import compose

    from safety_units.evaluation.suite import prompt_set_texts

    from safety_units.data.datamodule import build_datamodule

    cfg = compose("train", ["data=harmful_mix", f"data.harmful_share={p}"])
    assert build_datamodule(cfg.data, tokenizer=None).stats == {"harmful_share": p}  # the config instantiates
    sources = cfg.data.sources
    assert sources.harmful.weight == pytest.approx(p) and sources.benign.weight == pytest.approx(1 - p)
    assert cfg.data.self_distill.teacher._target_.endswith("load_smollm2")  # the shipped model answers
    trained = prompt_set_texts(sources, where="data.sources")
    assert len(trained) > 2000
    suite = compose("evaluate", ["eval=suite"]).eval.tasks
    for name, task in suite.items():
        if task is None or task.get("type") != "refusal":
            continue
        evaluated = prompt_set_texts({name: task.source}, where=f"eval.tasks.{name}")
        assert evaluated and not trained & evaluated, f"eval task {name} shares prompts with the harmful mixture"


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


def test_dolly_fine_tune_and_its_held_out_perplexity_set_are_disjoint():
    from conftest import compose

    from safety_units.evaluation.suite import prompt_set_texts

    trained = prompt_set_texts(compose("train", ["data=dolly"]).data.sources, where="data.sources")
    held_out = prompt_set_texts({"ppl_dolly": compose("evaluate", ["eval=ppl_dolly"]).eval.tasks.ppl_dolly.source})
    assert len(held_out) >= 50 and len(trained) >= 250 and not trained & held_out


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
