"""Multiple-choice and label tasks by log-likelihood (safety_units.evaluation.multiple_choice)."""
import math

import pytest
import torch
from conftest import FIXTURES
from omegaconf import OmegaConf

from safety_units.evaluation.multiple_choice import _encode_pair, load_mc, loglikelihoods, run_mc


def test_mc_loglikelihood_equals_hand_computation(tiny):
    model, tok = tiny.model.eval(), tiny.tokenizer
    pairs = [("Question: Which is a mammal?\nAnswer:", " whale"), ("Question: Which is a mammal?\nAnswer:", " shark"),
             ("The sky is", " blue today"), ("The sky is ", "green")]
    ours = loglikelihoods(model, tok, pairs, batch_size=3, progress=False)
    for (ctx, cont), got in zip(pairs, ours):
        c, k = _encode_pair(tok, ctx, cont)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([c + k])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        hand = sum(float(lp[len(c) - 1 + i, t]) for i, t in enumerate(k))
        assert abs(got - hand) < 1e-4
    # acc picks the highest sum, acc_norm divides by the continuation's byte length
    settings = OmegaConf.create({"batch_size": 4, "limit": None, "seed": 0})
    task = OmegaConf.create({"format": "arc_jsonl", "path": str(FIXTURES / "mc_arc.jsonl")})
    res = run_mc("arc", task, settings, model, tok)
    assert [r.metric for r in res] == ["acc", "acc_norm"] and res[0].n == 2  # " 0 C" vs " 50 C": lengths differ
    items = load_mc("arc_jsonl", task.path)
    scores = loglikelihoods(model, tok, [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)],
                            progress=False)
    by_hand = int(max(range(3), key=lambda i: scores[i]) == 1) + int(max(range(2), key=lambda i: scores[3 + i]) == 0)
    assert res[0].value == by_hand / 2
    conts = [k for it in items for k in it.continuations]
    norm = [x / len(k.encode("utf-8")) for x, k in zip(scores, conts)]
    by_hand_norm = int(max(range(3), key=lambda i: norm[i]) == 1) + int(max(range(2), key=lambda i: norm[3 + i]) == 0)
    assert res[1].value == by_hand_norm / 2
    assert res[0].extra["outcomes"] == [int(max(range(3), key=lambda i: scores[i]) == 1),
                                        int(max(range(2), key=lambda i: scores[3 + i]) == 0)]


def test_mc_drops_acc_norm_when_choices_are_equally_long(tiny):
    """MMLU's continuations are " A".." D": dividing by their (equal) byte length cannot change the argmax."""
    settings = OmegaConf.create({"batch_size": 4, "limit": None, "seed": 0})
    mmlu = OmegaConf.create({"format": "mmlu_csv", "path": str(FIXTURES / "mc_mmlu.csv")})
    res = run_mc("mmlu", mmlu, settings, tiny.model.eval(), tiny.tokenizer)
    assert [r.metric for r in res] == ["acc"] and res[0].n == 2 and len(res[0].extra["outcomes"]) == 2
    boolq = OmegaConf.create({"format": "boolq", "path": str(FIXTURES / "mc_boolq.jsonl")})  # " no" / " yes"
    assert [r.metric for r in run_mc("boolq", boolq, settings, tiny.model, tiny.tokenizer)] == ["acc", "acc_norm"]


@pytest.mark.parametrize("fmt,fname,n_choices,gold", [
    ("mmlu_csv", "mc_mmlu.csv", 4, 1), ("arc_jsonl", "mc_arc.jsonl", 3, 1), ("hellaswag", "mc_hellaswag.jsonl", 4, 0),
    ("boolq", "mc_boolq.jsonl", 2, 1), ("piqa", "mc_piqa.jsonl", 2, 0), ("winogrande", "mc_winogrande.jsonl", 2, 0),
    ("openbookqa", "mc_obqa.jsonl", 2, 0),
])
def test_mc_adapters(fmt, fname, n_choices, gold):
    item = load_mc(fmt, str(FIXTURES / fname))[0]
    assert len(item.continuations) == len(item.contexts) == n_choices and item.gold == gold
    if fmt == "mmlu_csv":
        assert item.contexts[0].endswith("D. 6\nAnswer:") and "about mc mmlu" not in item.contexts[0]
    if fmt == "winogrande":
        assert item.contexts == ["The trophy did not fit in the case because the trophy",
                                 "The trophy did not fit in the case because the case"]
        assert item.continuations[0] == " was too big."
    if fmt == "hellaswag":
        assert item.contexts[0] == "Baking: A man puts flour in a bowl. He" and "[title]" not in item.continuations[1]


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


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "phi3", "gpt_neox", "falcon", "opt", "mixtral"])
def test_a_shared_prefix_runs_once_and_gives_the_one_pass_states(arch, monkeypatch):
    """Rows that begin with the same tokens (a chat template and an instruction) run that prefix once, its cache
    repeated over the rows: the scored states equal one pass over the whole batch, on every architecture."""
    from testkit import VOCAB, build_arch

    import safety_units.evaluation.multiple_choice as mc

    model = build_arch(arch).eval()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, VOCAB, (20,), generator=g).tolist()
    seqs = sorted([tuple(prefix + torch.randint(3, VOCAB, (n,), generator=g).tolist()) for n in (9, 6, 3)],
                  key=len, reverse=True)
    ids = torch.zeros(3, len(seqs[0]), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
    with torch.inference_mode():
        whole = mc.hidden_states(model, ids, mask)
        shared, start = mc.shared_prefix_states(model, ids, mask, seqs, first_target=len(seqs[-1]) - 1)
    assert start == 20  # the prefix ran once
    for r, s in enumerate(seqs):
        torch.testing.assert_close(shared[r, :len(s) - start], whole[r, start:len(s)], atol=2e-5, rtol=1e-4)
    monkeypatch.setattr(mc, "MIN_SHARED_PREFIX", 10 ** 6)  # below the minimum: one pass, from position 0
    assert mc.shared_prefix_states(model, ids, mask, seqs, first_target=len(seqs[-1]) - 1)[1] == 0
