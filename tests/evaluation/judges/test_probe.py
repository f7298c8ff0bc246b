"""The learned refusal probe (judge=probe): trained once from real refusal / answer texts, then loaded from cache."""

import pytest
from conftest import compose

from safety_units.evaluation.judges.probe import ProbeJudge
from safety_units.evaluation.suite import build_judge


def test_probe_judge_trains_caches_and_separates(tmp_path, tiny, monkeypatch):
    tiny.model.save_pretrained(tmp_path / "backbone")
    tiny.tokenizer.save_pretrained(tmp_path / "backbone")
    overrides = ["judge=probe", f"judge.backbone_path={tmp_path / 'backbone'}", f"judge.cache_dir={tmp_path / 'c'}",
                 "judge.refusal_sources.wei.limit=60", "judge.refusal_sources.stl.limit=60",
                 "judge.compliance_sources.alpaca.limit=120", "judge.compliance_sources.self_harmful=null",
                 "judge.compliance_sources.self_benign=null", "judge.device=cpu"]
    judge = build_judge(compose("evaluate", overrides).judge)
    assert isinstance(judge, ProbeJudge)
    assert judge.path.is_file() and judge.info["refusal_texts"] > 50 and judge.info["compliance_texts"] > 100
    probs = judge.probabilities(["I'm sorry, but I cannot help with that request.",
                                 "The capital of France is Paris, a city on the Seine."])
    assert all(0.0 <= p <= 1.0 for p in probs)

    monkeypatch.setattr(ProbeJudge, "_train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = build_judge(compose("evaluate", overrides).judge)
    assert again.path == judge.path
    assert again.probabilities(["I'm sorry, but I cannot help with that request."])[0] == pytest.approx(probs[0])
    verdicts = again.judge(["q", "q"], ["I'm sorry, but I cannot help with that request.", ""])
    assert verdicts[0].reason.startswith("probe: p(refusal)=") and verdicts[1].reason == "empty"
