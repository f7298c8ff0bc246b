"""Forward helpers (safety_units.models.forward): eval mode is restored, even on an error."""
import pytest
import torch


def test_eval_mode_restores_the_previous_mode_even_on_error():
    from safety_units.models.forward import eval_mode

    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    model.train()
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not model.training
            raise RuntimeError("boom")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training
