"""`defense=vaccine`: perturbation-aware alignment (Huang et al. 2024), following git-disl/Vaccine `trainer.py`,
VaccineTrainer. Its loss is one loss, so its gradient flows through the freeze masks' hooks: frozen entries stay
exact."""

from __future__ import annotations

import torch

from safety_units.defenses.base import Defense
from safety_units.models.forward import forward_hooks
from safety_units.utils.errors import ConfigError


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention blocks whose outputs Vaccine perturbs (LlamaAttention in its code; any `*Attention`
    module directly under a decoder layer here: Llama, Mistral, Qwen2/3, Gemma, OLMo, GPT-2)."""
    mods = [m for n, m in model.named_modules() if type(m).__name__.endswith("Attention") and
            n.rsplit(".", 1)[-1] in ("self_attn", "attn")]
    if not mods:
        raise ConfigError("defense=vaccine: the model has no self-attention modules named self_attn / attn.")
    return mods


class VaccineLoss:
    """Vaccine's update rule. Per step: a first forward/backward on the alignment batch gives the gradient of the
    loss with respect to every attention block's output; the perturbation is rho * g / ||g|| (one norm over all
    blocks); a second forward adds it to the outputs, and that loss is what trains. The model learns to keep its
    alignment loss low under the worst-case embedding drift that harmful fine-tuning would cause.
    """

    def __init__(self, rho: float = 2.0):
        if rho < 0:
            raise ConfigError(f"defense.rho must be >= 0, got {rho}.")
        self.rho = float(rho)
        self.last_terms: dict[str, float] = {}

    def loss(self, module, batch) -> torch.Tensor:
        model = module.model
        blocks = attention_modules(model)
        outputs: list[torch.Tensor] = []

        def capture(_m, _inp, out):
            outputs.append(out[0] if isinstance(out, tuple) else out)

        with forward_hooks({b: capture for b in blocks}):
            first = model(**batch).loss
        grads = torch.autograd.grad(first, outputs, allow_unused=True)
        grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)) + 1e-7
        eps = {b: (self.rho * g / norm).to(g.dtype).detach() for b, g in zip(blocks, grads)}

        def perturb(m, _inp, out):
            if isinstance(out, tuple):
                return (out[0] + eps[m], *out[1:])
            return out + eps[m]

        with forward_hooks({b: perturb for b in blocks}):
            loss = model(**batch).loss
        self.last_terms = {"defense/clean_loss": float(first.detach())}
        return loss


class Vaccine(Defense):
    """Trains the alignment data with VaccineLoss (two forward passes a step). rho = 2: the README's example."""

    def __init__(self, name: str = "vaccine", stage: str = "align", rho: float = 2.0):
        super().__init__(name, stage)
        self.rho = rho

    def training_objective(self, tokenizer, data, seed):
        return VaccineLoss(rho=self.rho)
