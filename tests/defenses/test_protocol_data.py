"""The harmful fine-tuning protocol's data and FA task that the defenses are benchmarked on: data=task_mix (SST-2 with
label words and a harmful share), TSV rows, and eval=defense's label task scored by log-likelihood. (Moved from
test_training_time.py; they test safety_units.data and safety_units.evaluation, not a defense module.)"""

import math

import pytest
from conftest import SHARED_DATA, compose

needs_data = pytest.mark.skipif(not (SHARED_DATA / "hft").is_dir(), reason="needs ../shared/data/hft")


@needs_data
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


def test_label_task_scores_the_label_words(tiny, tmp_path, monkeypatch):
    """FA by constrained scoring: the prediction is the label word with the highest log-likelihood after the
    chat-formatted prompt; accuracy and the majority floor follow."""
    from omegaconf import OmegaConf

    import safety_units.evaluation.multiple_choice as mc

    f = tmp_path / "dev.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"s{i} \t{int(i < 4)}\n" for i in range(6)))
    task = OmegaConf.create({"type": "label", "source": {"path": str(f), "prompt": "sentence", "response": "label",
                                                         "labels": {"0": "negative", "1": "positive"}}})
    settings = OmegaConf.create({"batch_size": 4, "seed": 0})
    real = mc.run_label("sst2", task, settings, tiny.model.eval(), tiny.tokenizer)[0]  # runs on a real model
    assert real.n == 6 and math.isclose(sum(real.extra["predicted_share"].values()), 1.0)
    asked = []

    def always_positive(model, tokenizer, pairs, **kw):
        asked.extend(pairs)
        return [0.0 if cont == "positive" else -1.0 for _, cont in pairs]

    monkeypatch.setattr(mc, "loglikelihoods", always_positive)
    res = mc.run_label("sst2", task, settings, tiny.model, tiny.tokenizer)[0]
    assert res.value == 4 / 6 and res.extra["majority"] == round(4 / 6, 4)
    assert res.extra["outcomes"] == [1, 1, 1, 1, 0, 0]
    assert asked[0][0].rstrip().endswith("assistant") and {c for _, c in asked} == {"positive", "negative"}
