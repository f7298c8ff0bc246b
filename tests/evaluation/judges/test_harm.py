"""The harmfulness judge: the BeaverTails parser, the prompt split, and the probe on a tiny random backbone."""
import json
import random

import pytest
import torch

from safety_units.utils.errors import ConfigError, DataError
from safety_units.evaluation.judges.harm import HarmProbeJudge, beavertails_pairs, embed_pairs, split_half, training_rows
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


def test_early_exit_features_match_the_full_forward(tiny):
    """embed_pairs stops at the wanted layer; the result is hidden_states[layer] of the whole model."""
    tok, model = tiny.tokenizer, tiny.model.eval()
    got = embed_pairs(model, tok, ["what is two plus two?"], ["It is four."], layer=1, max_tokens=16)
    from safety_units.data.chat import prompt_text

    prefix = tok(prompt_text(tok, [{"role": "user", "content": "what is two plus two?"}]),
                 add_special_tokens=False)["input_ids"]
    resp = tok("It is four.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([prefix + resp]), output_hidden_states=True).hidden_states[1]
    assert torch.allclose(got[0], hs[0, len(prefix):].mean(0), atol=1e-5)


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
