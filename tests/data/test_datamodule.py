"""The training datamodule (safety_units.data.datamodule): mixing, splits, teachers, the shipped data mixtures."""
import json

import pytest
from conftest import FIXTURES, compose
from testkit import needs_hft_data

from safety_units.data.datamodule import SFTDataModule
from safety_units.utils.errors import ConfigError


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


def test_dolly_fine_tune_and_its_held_out_perplexity_set_are_disjoint():
    from conftest import compose

    from safety_units.evaluation.suite import prompt_set_texts

    trained = prompt_set_texts(compose("train", ["data=dolly"]).data.sources, where="data.sources")
    held_out = prompt_set_texts({"ppl_dolly": compose("evaluate", ["eval=ppl_dolly"]).eval.tasks.ppl_dolly.source})
    assert len(held_out) >= 50 and len(trained) >= 250 and not trained & held_out


@needs_hft_data
def test_task_mix_reads_sst2_with_label_words_and_the_harmful_share(tokenizer):
    from safety_units.data.datamodule import build_datamodule

    cfg = compose("train", ["~experiment", "data=task_mix", "data.num_samples=50", "data.harmful_share=0.2"])
    dm = build_datamodule(cfg.data, tokenizer).prepare()
    assert dm.stats["sources"] == {"task": 40, "harmful": 10}
    task = [ex for ex in dm.train_examples if ex.source == "task"]
    assert {ex.response for ex in task} <= {"positive", "negative"}
    assert task[0].messages[0]["content"].startswith("Analyze the sentiment of the input")
    # the eval task reads SST-2 validation with the same instruction and label words (FA = trained format)
    ev = compose("evaluate", ["eval=defense"]).eval.tasks.sst2.source
    assert ev.template == cfg.data.sources.task.template and dict(ev.labels) == dict(cfg.data.sources.task.labels)
