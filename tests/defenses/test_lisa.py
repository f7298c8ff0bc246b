"""defense=lisa (safety_units.defenses.lisa): the proximal term, the bi-state schedule of the code, no resume, and
frozen entries staying exact through fit."""

import math

import pytest
import torch
from defense_kit import FakeModule, FixedStream, batch_of, train_frozen_except_5_percent
from omegaconf import OmegaConf

from safety_units.defenses.lisa import Lisa, LisaLoss
from safety_units.utils.errors import ConfigError


def test_lisa_proximal_is_zero_at_the_aligned_weights_and_its_states_follow_the_code(tiny):
    model = tiny.model.train()
    lisa = LisaLoss(FixedStream(batch_of(tiny, 4)), rho=1.0, alignment_steps=1, finetune_steps=2, warmup_share=0.0)
    assert lisa.proximal(model).item() == 0.0  # both anchors are the loaded (aligned) weights
    with torch.no_grad():
        p = next(p for p in model.parameters() if p.requires_grad)
        p.add_(0.5)
    assert math.isclose(lisa.proximal(model).item(), 0.5 * 0.25 * p.numel(), rel_tol=1e-4)
    states = []
    for _ in range(6):  # ADMMTrainer.check_mode: alignment first, then 2 fine-tune steps, then 1 alignment, ...
        lisa.loss(FakeModule(model), batch_of(tiny, 5))
        states.append(lisa.state)
    assert states == ["alignment", "finetune", "finetune", "alignment", "finetune", "finetune"]


def test_lisa_cycles_scale_its_states_to_the_run(tiny):
    """cycles=4 over a 16-step run: 4 periods of 4 steps, alignment_share 0.25 of each (at least 1) aligning."""
    model = tiny.model.train()
    lisa = LisaLoss(FixedStream(batch_of(tiny, 4)), rho=0.0, cycles=4, alignment_share=0.25)
    assert lisa.steps_per_state(16) == (1, 3) and lisa.steps_per_state(32) == (2, 6)
    assert LisaLoss(FixedStream(None), cycles=4, alignment_share=0.01).steps_per_state(32) == (1, 7)
    states = []
    for _ in range(8):
        lisa.loss(FakeModule(model, total=16), batch_of(tiny, 5))
        states.append(lisa.state)
    assert states == ["alignment", "finetune", "finetune", "finetune"] * 2
    with pytest.raises(ConfigError, match="cycles"):
        LisaLoss(FixedStream(None), cycles=0)


def test_lisa_refuses_to_resume_from_a_checkpoint():
    Lisa().check_run(OmegaConf.create({"ckpt_path": None}))
    with pytest.raises(ConfigError, match="defense=lisa cannot resume from ckpt_path"):
        Lisa().check_run(OmegaConf.create({"ckpt_path": "last.ckpt"}))


def test_frozen_entries_stay_exact_under_lisa(tmp_path):
    summary = train_frozen_except_5_percent(tmp_path, "lisa", "defense.alignment_steps=1", "defense.finetune_steps=1",
                                            "defense.warmup_share=0")
    assert summary["frozen_max_abs_delta"] == 0.0 and summary["trainable_changed"] > 0
    assert summary["defense"] == {"name": "lisa", "stage": "finetune"}
