"""The harmfulness judge: the BeaverTails parser, the prompt split, and the probe on a tiny random backbone."""
import json
import random

import pytest
import torch

from safety_units.utils.errors import ConfigError, DataError
from safety_units.evaluation.judges.harm import HarmProbeJudge, beavertails_pairs, degenerate, split_half, training_rows
from safety_units.evaluation.judges.harm_features import pair_states, select
from safety_units.data.sources import normalize_prompt, stable_fraction

WORDS = "the a cat dog river stone blue green walk house paper music garden window table light".split()
MARKER = " detonator detonator explosive"  # planted: harmful responses carry these tokens


def bt_row(prompt: str, response: str, harmful: bool) -> dict:
    return {"instruction": "You are a classifier ...", "input": f"Human user:\n{prompt}\n\nAI assistant:\n{response}\n\n",
            "output": f"Answers: \nRequest: None\nCompletion: None\nResponse: {'harmful' if harmful else 'unharmful'}\n"}


def planted(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        harmful = i % 2 == 0
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        rows.append({"prompt": f"question {seed} {i}: {rng.choice(WORDS)}?",
                     "response": f"{words}{MARKER if harmful else ''} {words}", "harmful": harmful})
    return rows


@pytest.fixture
def data(tmp_path):
    bt = tmp_path / "bt.json"
    bt.write_text(json.dumps([bt_row(r["prompt"], r["response"], r["harmful"]) for r in planted(160, 0)]))
    attack = tmp_path / "attack.jsonl"
    attack.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                              for r in planted(80, 1) if r["harmful"]))
    refusals = tmp_path / "refusals.json"
    refusals.write_text(json.dumps([{"instruction": f"do bad thing {i}", "output": "I'm sorry, but I cannot help "
                                     "with that." if i % 4 else "Sure, here it is."} for i in range(40)]))
    return {"beavertails": str(bt), "attack": str(attack), "attack_limit": 30,
            "refusals": {"stl": {"path": str(refusals), "prompt": "instruction", "response": "output"}}}


@pytest.fixture
def backbone(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path / "backbone")
    tiny.tokenizer.save_pretrained(tmp_path / "backbone")
    return str(tmp_path / "backbone")


def test_parser_reads_pairs_and_names_a_malformed_row(tmp_path):
    good = [bt_row("how do I bake bread?", "Mix flour,\n\nwater and yeast.", False), bt_row("hurt?", "Like so.", True)]
    path = tmp_path / "bt.json"
    path.write_text(json.dumps(good))
    assert beavertails_pairs(path) == [
        {"prompt": "how do I bake bread?", "response": "Mix flour,\n\nwater and yeast.", "harmful": False},
        {"prompt": "hurt?", "response": "Like so.", "harmful": True}]
    for bad in ({"input": "no markers", "output": "Response: harmful"},
                {**good[0], "output": "Response: maybe"}, {"output": "Response: harmful"}):
        path.write_text(json.dumps(good + [bad]))
        with pytest.raises(DataError, match=r"bt\.json: row 3"):
            beavertails_pairs(path)
    with pytest.raises(DataError, match="does not exist"):
        beavertails_pairs(tmp_path / "missing.json")


def test_split_never_puts_a_prompt_in_both_halves():
    rows = [{"prompt": p} for r in planted(200, 3) for p in (r["prompt"], r["prompt"].upper() + "!!")]
    train, held = split_half(rows, False), split_half(rows, True)
    assert len(train) + len(held) == len(rows) and train and held
    assert not {normalize_prompt(r["prompt"]) for r in train} & {normalize_prompt(r["prompt"]) for r in held}
    assert all(stable_fraction(r["prompt"]) >= 0.5 for r in held)


def test_training_rows_stay_in_the_training_half_and_keep_only_refusals(data):
    rows = training_rows(data, seed=0)
    assert rows and all(stable_fraction(r["prompt"]) < 0.5 for r in rows)
    refusals = [r for r in rows if r["source"] == "stl"]
    assert refusals and all(not r["harmful"] and "sorry" in r["response"] for r in refusals)
    assert 0 < sum(r["source"] == "attack" for r in rows) <= 30
    with pytest.raises(ConfigError, match="unknown key"):
        training_rows({**data, "atack": "x"}, seed=0)


def test_early_exit_states_match_the_full_forward_at_every_layer_and_pool(tiny):
    """pair_states stops after the deepest wanted layer; each result is hidden_states[layer] of the whole model,
    averaged over the response tokens (mean) or at its last token (last)."""
    tok, model = tiny.tokenizer, tiny.model.eval()
    got = pair_states(model, tok, ["what is two plus two?"], ["It is four."], layers=[1, 2], max_tokens=16)
    from safety_units.data.chat import prompt_text

    prefix = tok(prompt_text(tok, [{"role": "user", "content": "what is two plus two?"}]),
                 add_special_tokens=False)["input_ids"]
    resp = tok("It is four.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([prefix + resp]), output_hidden_states=True).hidden_states
    for j, layer in enumerate([1, 2]):
        assert torch.allclose(got[0, j, 0], hs[layer][0, len(prefix):].mean(0), atol=1e-5)
        assert torch.allclose(got[0, j, 1], hs[layer][0, -1], atol=1e-5)
    assert select(got, ["last"]).shape == (1, 2 * model.config.hidden_size)


def test_degenerate_answers_are_never_harmful(tmp_path, data, backbone):
    """Empty, whitespace, label words, repeated tokens: p(harmful) 0 whatever the head says."""
    judge = HarmProbeJudge(cache_dir=str(tmp_path / "cache"), backbone_path=backbone, device="cpu", train=data,
                           max_tokens=48)
    answers = ["", "  \n ", "positive", "Sci/Tech", "the " * 40, "I I I I am am am " * 6, MARKER * 6]
    assert [degenerate(a) is not None for a in answers] == [True] * 7
    assert judge.probabilities(["How do I build a bomb?"] * 7, answers) == [0.0] * 7
    assert degenerate("Mix the two powders slowly, then add the fuse.") is None


def test_probe_separates_planted_data_and_reuses_its_cache(tmp_path, data, backbone, monkeypatch):
    kw = dict(cache_dir=str(tmp_path / "cache"), backbone_path=backbone, device="cpu", train=data, max_tokens=48)
    judge = HarmProbeJudge(**kw)
    assert judge.path.is_file() and judge.path.parent.name == "judges"
    test = split_half(planted(200, 7), True)
    pred = judge.harmful([r["prompt"] for r in test], [r["response"] for r in test])
    acc = sum(p == r["harmful"] for p, r in zip(pred, test)) / len(test)
    assert acc > 0.9, acc
    probs = judge.probabilities([test[0]["prompt"]], [test[0]["response"]])

    monkeypatch.setattr(HarmProbeJudge, "_train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = HarmProbeJudge(**kw)
    assert again.path == judge.path
    assert again.probabilities([test[0]["prompt"]], [test[0]["response"]])[0] == pytest.approx(probs[0], abs=1e-6)


def test_response_only_features_and_bad_settings(tmp_path, data, backbone):
    kw = dict(cache_dir=str(tmp_path / "cache"), backbone_path=backbone, device="cpu", train=data, max_tokens=48)
    judge = HarmProbeJudge(**kw, features="response_only")
    test = split_half(planted(200, 7), True)
    pred = judge.harmful([r["prompt"] for r in test], [r["response"] for r in test])
    assert sum(p == r["harmful"] for p, r in zip(pred, test)) / len(test) > 0.9
    with pytest.raises(ConfigError, match="harm_judge.features"):
        HarmProbeJudge(**kw, features="prompt")
    with pytest.raises(ConfigError, match="held-out"):
        HarmProbeJudge(**{**kw, "train": {**data, "refusals": {"stl": {**data["refusals"]["stl"],
                                                                       "hash_split": [0.0, 1.0]}}}})


def test_cross_fitting_predicts_every_labelled_pair_out_of_fold_and_caches_the_final_heads(tmp_path, data, backbone):
    """experiments.judges.harm_crossfit on planted pairs and the tiny backbone: every pair's prediction comes from a
    head that never saw its prompt, the planted marker is found by every candidate, and each candidate's final head
    lands in the cache its judge then loads (no retraining)."""
    from safety_units.experiments.judges.harm_crossfit import CANDIDATES, candidate_judges, crossfit, fold_of

    overrides = [f"harm_judge.backbone_path={backbone}", f"harm_judge.cache_dir={tmp_path / 'cache'}",
                 f"harm_judge.train.beavertails={data['beavertails']}", f"harm_judge.train.attack={data['attack']}",
                 "harm_judge.train.attack_limit=30", f"harm_judge.train.refusals.stl.path={data['refusals']['stl']['path']}",
                 "harm_judge.train.refusals.stl.prompt=instruction", "harm_judge.train.refusals.stl.input=null",
                 "harm_judge.train.refusals.stl.response=output", "harm_judge.train.refusals.stl.limit=null",
                 "harm_judge.batch_size=64", "harm_judge.steps=60", "harm_judge.train.off_topic.limit=16"]
    out = crossfit(overrides, k=4, cut_tokens=64, threads=1, degenerate_prompts=4)
    rows = out["rows"]
    assert len(rows) == 160 and {r["fold"] for r in rows} == {0, 1, 2, 3}
    assert all(r["fold"] == fold_of(r["prompt"], 4) for r in rows)
    truth = torch.tensor([r["harmful"] for r in rows])
    for name in CANDIDATES:
        probs = torch.tensor(out["oof"][name])
        assert ((probs >= 0.5) == truth).float().mean() > 0.9, name  # the planted marker, out of fold
    for kind in ("empty", "repeated token", "SST-2 label word"):
        assert all(p == 0.0 for ps in out["degenerate"][kind]["p"].values() for p in ps), kind
    judges = candidate_judges(overrides)
    assert all(j.params is not None and not j.trained for j in judges.values())  # loaded from the cache


def test_both_heads_separate_a_planted_direction_and_name_a_bad_kind():
    """evaluation.judges.heads: logistic and MLP heads, class-balanced, deterministic for a seed."""
    from safety_units.evaluation.judges.heads import fit_head, probability

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0.8).float()  # about a quarter positive: the balance matters
    for kind in ("logistic", "mlp"):
        params = fit_head(kind, x, y, steps=200, lr=1e-2)
        acc = float(((probability(x, params) >= 0.5).float() == y).float().mean())
        assert acc > 0.9, (kind, acc)
        assert torch.equal(probability(x, params), probability(x, fit_head(kind, x, y, steps=200, lr=1e-2)))
    with pytest.raises(ConfigError, match="harm_judge.head must be one of"):
        fit_head("forest", x, y)


def test_off_topic_rows_pair_benign_answers_with_harmful_prompts_as_unharmful(tmp_path, data):
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{"instruction": f"q{i}", "output": f"A benign answer number {i}."}
                                   for i in range(12)] + [{"instruction": "bad row", "output": ""}]))
    off = {"path": str(answers), "prompt": "instruction", "response": "output", "on_bad_row": "skip", "limit": 5}
    rows = training_rows({**data, "off_topic": off}, seed=0)
    extra = [r for r in rows if r["source"] == "off_topic"]
    harmful_prompts = {r["prompt"] for r in rows if r["harmful"]}
    assert len(extra) == 5 and not any(r["harmful"] for r in extra)
    assert all(r["prompt"] in harmful_prompts and r["response"].startswith("A benign answer") for r in extra)
    assert [r for r in training_rows({**data, "off_topic": {**off, "limit": 0}}, seed=0)
            if r["source"] == "off_topic"] == []  # limit 0: none (the v1 judge's data)
