"""Preference and unlearning rows (safety_units.data.pairs): a benign row without an answer is skipped or named."""
import pytest
from conftest import train_cfg
from testkit import fake_own_answers

from safety_units.utils.errors import ConfigError


def test_a_benign_row_without_an_answer_is_skipped_or_named(tmp_path, monkeypatch):
    """Alpaca has rows with an empty output: a source whose answers are the chosen ones must skip them under
    on_bad_row=skip (the study's DPO stages failed on them) and name the file otherwise."""
    import json

    import safety_units.data.pairs as pairs
    from safety_units.utils.errors import DataError
    from safety_units.training.fit import run_train

    monkeypatch.setattr(pairs, "self_distill_responses", fake_own_answers)
    benign = tmp_path / "benign.jsonl"
    rows = [{"instruction": f"Name a colour number {i}.", "output": f"Blue {i}."} for i in range(7)]
    benign.write_text("\n".join(json.dumps(r) for r in [*rows, {"instruction": "Say nothing.", "output": ""}]))
    small = ["objective=dpo", "data=preference", "model@data.self_distill.teacher=tiny", f"data.sources.benign.path={benign}",
             "~data.sources.benign.input", "~data.sources.benign.hash_split", "data.num_samples=8",
             "data.max_length=32", "data.val_fraction=0.0", "trainer.max_steps=1", "export=false"]
    summary = run_train(train_cfg(tmp_path / "skip", *small))
    assert summary["train_examples"] == 4 + 4  # 4 refusal pairs and 4 of the 7 answered benign rows
    with pytest.raises((ConfigError, DataError), match="benign.jsonl"):
        run_train(train_cfg(tmp_path / "error", *small, "data.sources.benign.on_bad_row=error"))
