"""The synthetic task x concept world of Jain et al. (safety_units.experiments.synthetic.world): operators compute
what they say, safety is the task x concept combination, variants keep the semantics, and the tokenizer encodes
every example without unknown tokens."""

import pytest

from safety_units.data.chat import encode_example
from safety_units.experiments.synthetic.world import JAILBREAKS, World, apply, build_tokenizer


def test_operators():
    xs = [3, 1, 2, 5]
    assert apply("copy", xs, 6) == xs and apply("reverse", xs, 6) == [5, 2, 1, 3]
    assert apply("sort", xs, 6) == [1, 2, 3, 5] and apply("shift", xs, 6) == [4, 2, 3, 0]
    assert apply("drop_first", xs, 6) == [1, 2, 5] and apply("swap_pairs", xs, 6) == [1, 3, 5, 2]


def test_safety_is_the_task_concept_combination_and_safety_data_is_canonical():
    w = World(seed=0)
    rows = w.safety(400)
    assert all((r["response"] == "refuse") == w.unsafe(r["op"], r["concept"]) for r in rows)
    assert all(r["variant"] == "plain" and "b " not in r["prompt"].split(" ", 1)[0] for r in rows)
    assert 0.4 < sum(r["unsafe"] for r in rows) / len(rows) < 0.6
    assert w.unsafe(0, 0) and not w.unsafe(0, 5) and not w.unsafe(4, 0)  # the operator alone or concept alone: safe
    assert w.safety(50) == w.safety(50) and w.safety(50, seed=1) != w.safety(50)


def test_pretraining_answers_everything_in_every_spelling():
    w = World(seed=0)
    rows = w.pretraining(600)
    assert not any(r["response"] == "refuse" for r in rows)
    assert {r["variant"] for r in rows} == {"plain", "synonym", "composed"}
    assert any(r["unsafe"] for r in rows)  # the model learns to do the unsafe tasks too
    syn = next(r for r in rows if r["variant"] == "synonym")
    assert syn["prompt"].split()[0] == f"op{syn['op']}b"


def test_evaluation_groups_and_jailbreaks_are_unsafe_inputs():
    w = World(seed=0)
    rows = w.evaluation(10)
    groups = {g: [r for r in rows if r["group"] == g] for g in {r["group"] for r in rows}}
    assert set(groups) == {"safe", "unsafe", *(f"jailbreak_{v}" for v in JAILBREAKS)}
    assert all(not r["unsafe"] for r in groups["safe"]) and all(r["unsafe"] for r in groups["unsafe"])
    assert all(r["unsafe"] and r["prefill"] for r in groups["jailbreak_prefix"])
    composed = groups["jailbreak_composed"][0]
    assert f"c{composed['concept']}a with c{composed['concept']}b" in composed["prompt"]


def test_the_tokenizer_encodes_every_example_and_masks_the_prompt():
    w = World(seed=0)
    tok = build_tokenizer(w)
    unk = tok.convert_tokens_to_ids("<pad>")
    for r in w.pretraining(50) + w.safety(50):
        msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        enc = encode_example(tok, msgs, 64)
        body = [t for t in enc.input_ids if t != tok.bos_token_id]
        assert unk not in body
        answer = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
        assert tok.convert_ids_to_tokens(answer) == r["response"].split() + ["<eos>"]
    with pytest.raises(ValueError, match="unsafe_operators"):
        World(unsafe_operators=[9])
