"""defense=vaccine (safety_units.defenses.vaccine): the perturbation of the attention outputs, and frozen entries
staying exact through fit."""

import torch
from defense_kit import FakeModule, batch_of, train_frozen_except_5_percent

from safety_units.defenses.vaccine import VaccineLoss, attention_modules


def test_vaccine_rho_zero_is_the_plain_loss_and_hooks_are_removed(tiny):
    model = tiny.model.train()
    batch = batch_of(tiny)
    plain = model(**batch).loss
    v = VaccineLoss(rho=0.0)
    assert torch.allclose(v.loss(FakeModule(model), batch), plain)
    blocks = attention_modules(model)
    assert all(not b._forward_hooks for b in blocks)
    perturbed = VaccineLoss(rho=2.0).loss(FakeModule(model), batch)
    assert all(not b._forward_hooks for b in blocks)
    assert perturbed.item() > plain.item()  # the worst-case direction (gradient ascent) raises the loss


def test_vaccine_perturbs_along_the_normalised_activation_gradient(tiny):
    """The second pass equals a forward with rho * g / ||g|| added to every attention output by hand."""
    model = tiny.model.train()
    batch = batch_of(tiny, 1)
    blocks = attention_modules(model)
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o[0])) for b in blocks]
    loss = model(**batch).loss
    for h in hooks:
        h.remove()
    g = torch.autograd.grad(loss, outs)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    eps = {b: 2.0 * x / norm for b, x in zip(blocks, g)}
    hooks = [b.register_forward_hook(lambda m, i, o: (o[0] + eps[m], *o[1:])) for b in blocks]
    manual = model(**batch).loss
    for h in hooks:
        h.remove()
    assert torch.allclose(VaccineLoss(rho=2.0).loss(FakeModule(model), batch), manual, atol=1e-5)


def test_frozen_entries_stay_exact_under_vaccine(tmp_path):
    summary = train_frozen_except_5_percent(tmp_path, "vaccine")
    assert summary["frozen_max_abs_delta"] == 0.0 and summary["trainable_changed"] > 0
    assert summary["defense"] == {"name": "vaccine", "stage": "align"}
