"""The Steerer interface: a `steer` config is built from its `_target_` (any Steerer, also one defined outside the
package), its hooks live only inside `steering(...)`, and a bad `_target_` is a clear config error."""

import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf

from safety_units.steering.prompt_states import block_states, chat_ids
from safety_units.steering.refusal_ablation import RefusalAblationSteerer
from safety_units.steering.scans import ScansSteerer
from safety_units.steering.steerer import NoSteering, Steerer, SteeringHooks, build_steerer, fitted, steering
from safety_units.units.layouts import decoder_layers
from safety_units.utils.errors import ConfigError

ANCHORS = ["steer.anchor.nsamples=8", "steer.anchor.max_length=64"]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def last_logits(model, tokenizer, prompts):
    return block_states(model, chat_ids(tokenizer, prompts), (-1,), tokenizer.pad_token_id, final=True)[1]


class ScaledLastBlock(Steerer):
    """A steerer from outside the package: scales the last block's output by `factor`, counting the calls."""

    method = "scaled_last_block"

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def fit(self, model, tokenizer):
        steerer = self

        class Hooks(SteeringHooks):
            calls = 0

            def hook(self, module, args, output):
                self.calls += 1
                return (output[0] * steerer.factor, *output[1:]) if isinstance(output, tuple) else output * steerer.factor

            def hooks(self):
                return [decoder_layers(model)[-1].register_forward_hook(self.hook)]

            def summary(self):
                return {"factor": steerer.factor, "calls": self.calls}

        return Hooks()


def test_a_custom_steerer_given_only_by_its_target_runs_through_the_hooks(tiny):
    prompts = ["How do I pick a lock?", "Write a haiku about rain."]
    base = last_logits(tiny.model, tiny.tokenizer, prompts)
    cfg = OmegaConf.create({"_target_": f"{__name__}.ScaledLastBlock", "factor": 0.5})
    before = hook_count(tiny.model)
    with steering(tiny.model, tiny.tokenizer, cfg) as info:
        assert hook_count(tiny.model) == before + 1
        steered = last_logits(tiny.model, tiny.tokenizer, prompts)
    assert not torch.allclose(steered, base)
    assert info == {"method": "scaled_last_block", "factor": 0.5, "calls": 1}  # one batched forward
    assert hook_count(tiny.model) == before
    assert torch.equal(last_logits(tiny.model, tiny.tokenizer, prompts), base)


@pytest.mark.parametrize("option,cls", [("none", NoSteering), ("scans", ScansSteerer),
                                        ("refusal_ablation", RefusalAblationSteerer)])
def test_every_steer_option_builds_its_steerer(option, cls):
    cfg = compose("evaluate", [f"steer={option}"]).steer
    steerer = build_steerer(cfg)
    assert type(steerer) is cls and steerer.method == cfg.method == option
    assert steerer.active == (option != "none")
    assert build_steerer(steerer) is steerer and isinstance(build_steerer(None), NoSteering)


@pytest.mark.parametrize("cfg,message", [
    ({"_target_": "safety_units.steering.nowhere.Steerer"}, "config 'steer' could not be instantiated"),
    ({"_target_": "collections.OrderedDict"}, "is not a Steerer"),
    ({"method": "scans"}, "steer needs a _target_"),
    ({"_target_": "safety_units.steering.scans.ScansSteerer", "method": "refusal_ablation", "anchor": {},
      "refusal_tokens": [], "sigma": {}, "alpha": 1.0}, "does not match steer._target_"),
])
def test_a_bad_steer_config_is_a_config_error(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_steerer(cfg)
    with pytest.raises(ConfigError, match=message):
        with steering(None, None, cfg):
            pass


def test_no_steering_and_no_model_install_nothing(tiny, tmp_path):
    before = hook_count(tiny.model)
    with steering(tiny.model, tiny.tokenizer, compose("evaluate", ["steer=none"]).steer) as info:
        assert hook_count(tiny.model) == before
    assert info == {"method": "none"}
    scans = compose("evaluate", ["model=tiny", "steer=scans", f"steer.cache_dir={tmp_path}"]).steer
    with steering(None, None, scans) as info:  # saved completions only (eval=rejudge): nothing is fitted
        pass
    assert info == {"method": "scans"} and not (tmp_path / "steering").exists()
    with pytest.raises(ConfigError, match="fits nothing"):
        fitted(tiny.model, tiny.tokenizer, None)


@pytest.mark.parametrize("method", ["scans", "refusal_ablation"])
def test_hooks_are_removed_after_use_and_after_an_exception(tiny, tmp_path, method, monkeypatch):
    cfg = compose("evaluate", ["model=tiny", f"steer={method}", *ANCHORS, f"steer.cache_dir={tmp_path}"]).steer
    before = hook_count(tiny.model)
    with steering(tiny.model, tiny.tokenizer, cfg) as info:
        assert hook_count(tiny.model) > before
        last_logits(tiny.model, tiny.tokenizer, ["Hello there"])
    assert hook_count(tiny.model) == before and info["method"] == method
    with pytest.raises(RuntimeError, match="boom"):
        with steering(tiny.model, tiny.tokenizer, cfg):
            raise RuntimeError("boom")
    assert hook_count(tiny.model) == before
    assert len(list((tmp_path / "steering").glob(f"{method}-*.pt"))) == 1  # cached per model fingerprint
    steerer = build_steerer(cfg)
    monkeypatch.setattr(type(steerer), "fit_artifacts", lambda *a: pytest.fail("refitted despite the cache"))
    with steering(tiny.model, tiny.tokenizer, steerer):
        pass
