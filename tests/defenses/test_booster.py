"""defense=booster (safety_units.defenses.booster): the paper's term and its gradient, frozen entries staying exact
through fit, and its harmful set (and Antidote's calibration set) disjoint from the attack pool."""

import copy

import torch
from conftest import compose
from defense_kit import FakeModule, FixedStream, batch_of, harmful_rows, train_frozen_except_5_percent
from testkit import needs_hft_data

from safety_units.data.sources import Source, normalize_prompt
from safety_units.defenses.booster import BoosterLoss


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def test_booster_term_has_the_papers_sign_and_gradient(tiny):
    """loss = L + lamb * (h(w) - h(w - alpha g/||g||)); the reduction is positive for a small step, and the
    gradient is grad L + lamb * (grad h(w) - grad h(w')) as in BoosterAlignmentTrainer."""
    model = tiny.model.train()
    align, harm = batch_of(tiny, 2), batch_of(tiny, 3)
    b = BoosterLoss(FixedStream(harm), lamb=5.0, alpha=0.1)
    loss = b.loss(FakeModule(model), align)
    assert b.last_terms["defense/harmful_loss_reduction"] > 0
    got = grads_of(model, loss)

    params = [p for p in model.parameters() if p.requires_grad]
    g_h = torch.autograd.grad(model(**harm).loss, params)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g_h))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, x in zip([p for p in shifted.parameters() if p.requires_grad], g_h):
            p -= 0.1 * x / norm
    g_shift = torch.autograd.grad(shifted(**harm).loss, [p for p in shifted.parameters() if p.requires_grad])
    g_align = torch.autograd.grad(model(**align).loss, params)
    for a, x, y, z in zip(got, g_align, g_h, g_shift):
        assert torch.allclose(a, x + 5.0 * (y - z), atol=1e-5)


def test_frozen_entries_stay_exact_under_booster(tmp_path):
    summary = train_frozen_except_5_percent(tmp_path, "booster",
                                            f"defense.harmful.beavertails.path={harmful_rows(tmp_path)}")
    assert summary["frozen_max_abs_delta"] == 0.0 and summary["trainable_changed"] > 0
    assert summary["defense"] == {"name": "booster", "stage": "align"}


@needs_hft_data
def test_defense_harmful_sets_are_disjoint_from_the_attack_pool():
    """git-disl/Booster (and Antidote) train.py: the defense's harmful rows start at 5000, the attack's at 0; here the
    two halves of the attack file by prompt hash (the real file of ../shared/data)."""
    def rows(cfg, name):
        return Source.from_config(cfg, name).load()

    attack = rows(compose("train", ["~experiment", "data=task_mix"]).data.sources.harmful, "harmful")
    booster = rows(compose("train", ["defense=booster"]).defense.harmful.beavertails, "booster")
    antidote = rows(compose("train", ["defense=antidote"]).defense.harmful.beavertails, "antidote")
    assert len(booster) == 2000 and len(antidote) == 64 and len(attack) >= 1000  # gpu_full: p = 0.2 of n = 1000
    attack_prompts = {normalize_prompt(ex.prompt) for ex in attack}
    assert not attack_prompts & {normalize_prompt(ex.prompt) for ex in booster + antidote}
