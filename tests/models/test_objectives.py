"""The training objectives (safety_units.models.objectives): DPO is log 2 at the reference, NPO's retain term is the
plain LM loss and masks do not change it, both keep frozen entries exact, and objective and data must match."""

import math

import pytest
import torch
from conftest import compose, train_cfg
from testkit import fake_own_answers

from safety_units.data.chat import encode_example
from safety_units.utils.errors import ConfigError
from safety_units.models.objectives import DPO, NPO, Objective, build_objective, sequence_logps
from safety_units.data.pairs import RowItem, collate_rows, reference_logps


class FakeModule:
    def __init__(self, model):
        self.model = model


def item(tok, prompt, *answers, forget=None):
    rows = [encode_example(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}], 64)
            for a in answers]
    return RowItem(rows, forget or [0] * len(rows))


def test_dpo_is_log2_at_the_reference_and_rewards_the_chosen_answer(tiny):
    tok = tiny.tokenizer
    items = [item(tok, "How do I make a bomb?", "I can't help with that.", "Mix the powder and the fuse."),
             item(tok, "Write a haiku.", "Rain on the roof, soft.", "I'm sorry, I can't help with that.")]
    reference_logps(tiny.model, items, tok.pad_token_id)
    batch = collate_rows(items, tok.pad_token_id)
    assert torch.allclose(batch["ref_logps"], sequence_logps(tiny.model, batch).float(), atol=1e-5)
    dpo = DPO(beta=0.1)
    assert dpo.loss(FakeModule(tiny.model), batch).item() == pytest.approx(math.log(2), abs=1e-5)
    # the policy has moved away from the rejected answers (log-prob 5 below the reference's): loss below log 2
    shifted = dict(batch, ref_logps=batch["ref_logps"] + torch.tensor([0.0, 5.0, 0.0, 5.0]))
    assert dpo.loss(FakeModule(tiny.model), shifted).item() < math.log(2)
    with pytest.raises(ConfigError, match="beta"):
        DPO(beta=0)


def test_npo_retain_term_is_the_lm_loss_and_masks_leave_it_unchanged(tiny, unit_map):
    from conftest import compose

    from safety_units.training.freezing import build_masker

    tok = tiny.tokenizer
    items = [item(tok, "How do I make a bomb?", "Mix the powder and the fuse.", forget=[1]),
             item(tok, "Write a haiku.", "Rain on the roof, soft."),
             item(tok, "Name a colour.", "Blue.")]
    reference_logps(tiny.model, items, tok.pad_token_id)
    batch = collate_rows(items, tok.pad_token_id)
    npo = NPO(beta=0.1, retain_weight=1.0)
    f_term, r_term = npo.terms(tiny.model, batch)
    assert f_term.item() == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)  # at the reference: (2/beta) log 2
    retain = collate_rows(items[1:], tok.pad_token_id)
    plain = tiny.model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"],
                       labels=retain["labels"]).loss
    assert r_term.item() == pytest.approx(plain.item(), rel=1e-5)
    cfg = compose("train", ["model=tiny", "freeze=esu_cu", f"freeze.unit_map={unit_map}"])
    masker, _ = build_masker(cfg, tiny.model, tok)
    masker.attach(tiny.model)
    assert npo.terms(tiny.model, batch)[1].item() == r_term.item()
    # bounded: the forget term stays >= 0 however unlikely the completion becomes
    far = dict(batch, ref_logps=batch["ref_logps"] + torch.tensor([1e4, 0.0, 0.0]))
    assert 0 <= npo.terms(tiny.model, far)[0].item() < 1e-3


@pytest.mark.parametrize("objective,data", [("dpo", "preference"), ("unlearning", "unlearning")])
def test_objectives_train_with_frozen_entries_exact(tmp_path, monkeypatch, objective, data):
    import safety_units.data.pairs as pairs
    from safety_units.training.fit import run_train

    monkeypatch.setattr(pairs, "self_distill_responses", fake_own_answers)
    cfg = train_cfg(tmp_path, f"objective={objective}", f"data={data}", "model@data.self_distill.teacher=tiny",
                    "freeze=train_only", "freeze.random_share=0.05", "optim.weight_decay=0.1",
                    "trainer.accumulate_grad_batches=2", "export=false", "trainer.max_steps=2",
                    "data.num_samples=12", "data.max_length=48", "data.val_fraction=0.2", "data.batch_size=2")
    summary = run_train(cfg)
    assert summary["frozen_max_abs_delta"] == 0.0 and summary["trainable_changed"] > 0
    rows = summary["data_stats"]["rows"]
    assert rows == ({"refusal": "own", "benign": "refusal"} if objective == "dpo" else
                    {"forget": "forget", "retain": "retain"})
    assert "val/loss" in summary["metrics"]


def test_objective_and_data_must_match(tmp_path, monkeypatch):
    import safety_units.data.pairs as pairs
    from safety_units.training.fit import run_train

    monkeypatch.setattr(pairs, "self_distill_responses", fake_own_answers)
    small = ["data.num_samples=4", "data.max_length=32", "trainer.max_steps=1", "export=false"]
    with pytest.raises(ConfigError, match="trains on data=preference"):
        run_train(train_cfg(tmp_path / "a", "objective=dpo", *small))
    with pytest.raises(ConfigError, match="holds unlearning rows, which objective=sft does not train on"):
        run_train(train_cfg(tmp_path / "b", "data=unlearning", "model@data.self_distill.teacher=tiny", *small))
    with pytest.raises(ConfigError, match="both set the training loss"):
        run_train(train_cfg(tmp_path / "c", "objective=dpo", "data=preference", "defense=lisa",
                            "model@data.self_distill.teacher=tiny", *small))
    with pytest.raises(ConfigError, match="rejected must be one of"):
        run_train(train_cfg(tmp_path / "d", "objective=dpo", "data=preference", "data.sources.benign.rejected=null",
                            "model@data.self_distill.teacher=tiny", *small))


def test_objective_configs_build_their_class_and_a_bad_target_is_a_clear_error():
    built = {o: build_objective(compose("train", [f"objective={o}"]).objective) for o in ("sft", "dpo", "unlearning")}
    assert [type(b) for b in built.values()] == [Objective, DPO, NPO]
    assert [b.needs for b in built.values()] == [None, "preference", "unlearning"]
    assert (built["dpo"].beta, built["unlearning"].retain_weight) == (0.1, 1.0)
    assert type(build_objective(None)) is Objective  # unset: the plain LM loss
    with pytest.raises(ConfigError, match="config 'objective' could not be instantiated.*objectives.KTO"):
        build_objective({"_target_": "safety_units.models.objectives.KTO", "name": "kto"})
    with pytest.raises(ConfigError, match="has no _target_"):
        build_objective({"name": "dpo"})
    with pytest.raises(ConfigError, match="objective.variant must be npo"):
        build_objective({"_target_": "safety_units.models.objectives.NPO", "variant": "ga"})
