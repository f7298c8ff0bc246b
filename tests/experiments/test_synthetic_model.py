"""model=synthetic (safety_units.experiments.synthetic.model): a small Llama pretrained on the world once, resumable
after an interruption, then loaded from its cache."""

import pytest

SMALL = ["model.pretraining.steps=30", "model.pretraining.examples=500", "model.pretraining.checkpoint_every=10",
         "model.arch.num_layers=2", "model.arch.hidden_size=32", "model.arch.intermediate_size=64",
         "model.progress=false"]


def test_synthetic_model_pretrains_once_resumes_and_is_cached(tmp_path, monkeypatch):
    import json

    import safety_units.experiments.synthetic.model as sm
    from conftest import compose

    from safety_units.models.loading import load_model

    cfg = compose("train", ["model=synthetic", f"paths.cache_dir={tmp_path}", *SMALL]).model
    real_collate, calls = sm.collate, []

    def interrupted(*a, **k):  # a Ctrl-C at step 15: after the step-10 checkpoint
        calls.append(1)
        if len(calls) == 16:
            raise KeyboardInterrupt
        return real_collate(*a, **k)

    monkeypatch.setattr(sm, "collate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model(cfg)
    (ckpt,) = list((tmp_path / "synthetic").glob("*/ckpt.pt"))
    assert __import__("torch").load(ckpt, weights_only=False)["step"] == 10
    loaded = load_model(cfg)  # resumes at step 10
    report = json.loads(next((tmp_path / "synthetic").glob("*/model/pretraining.json")).read_text())
    assert report["steps"] == 30 and len(report["losses"]) == 30 and not ckpt.exists()
    assert set(report["task_accuracy"]) == {"safe", "unsafe", "jailbreak_synonym", "jailbreak_composed"}
    n = len(calls)
    again = load_model(cfg)  # from the cache: no pretraining
    assert len(calls) == n and again.name == loaded.name
    assert n >= 16 + 20  # 20 more steps after the resume (plus the accuracy batches)
    assert all((a == b).all() for a, b in zip(loaded.model.parameters(), again.model.parameters()))

