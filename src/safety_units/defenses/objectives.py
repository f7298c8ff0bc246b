"""Defenses against harmful fine-tuning that change what a training step optimises (`defense=vaccine|booster|
lisa`), and the data one (`defense=safeinstr`). Each follows its paper and its public code; the file followed is
named in each docstring. The after-fine-tuning defenses (SafeLoRA, Antidote) are in safety_units.defenses.posthoc; the
unit-level ones are freeze strategies (`defense=esu_cu` selects `freeze=esu_cu`, see conf/defense/).

A training objective is an object with `loss(module, batch) -> Tensor` that CausalLMModule.training_step calls
instead of `model(**batch).loss`. Every extra term is part of that one loss, so its gradient flows through the
freeze masks' tensor hooks like the plain loss does: frozen entries stay exact under every defense.
"""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig, OmegaConf

from safety_units.data.chat import collate, encode_example
from safety_units.utils.errors import ConfigError
from safety_units.models.forward import forward_hooks
from safety_units.utils.ranks import RankedLogger
from safety_units.data.sources import Source

log = RankedLogger(__name__)

STAGES = ("none", "align", "finetune", "post")


class BatchStream:
    """Endless seeded batches of one data source, encoded like the training data (for a defense's second set:
    Booster's harmful pairs, Lisa's alignment pairs)."""

    def __init__(self, sources: DictConfig | dict, tokenizer, batch_size: int, max_length: int, seed: int,
                 where: str):
        if not sources:
            raise ConfigError(f"{where} is empty: this defense needs a data source.")
        examples = []
        for name, cfg in (OmegaConf.to_container(sources, resolve=True) if isinstance(sources, DictConfig)
                          else sources).items():
            src = Source.from_config(cfg, name)
            examples += [ex for ex in src.load(seed) if ex.response is not None]
        if not examples:
            raise ConfigError(f"{where}: the sources hold no (prompt, response) pairs.")
        self.items = [encode_example(tokenizer, ex.messages, max_length) for ex in examples]
        self.pad_id = tokenizer.pad_token_id
        self.batch_size, self.rng = batch_size, random.Random(f"{seed}:{where}")
        self.order: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def next(self, device) -> dict[str, torch.Tensor]:
        if len(self.order) < self.batch_size:
            more = list(range(len(self.items)))
            self.rng.shuffle(more)
            self.order += more
        idx, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return {k: v.to(device) for k, v in collate([self.items[i] for i in idx], self.pad_id).items()}


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention blocks whose outputs Vaccine perturbs (LlamaAttention in its code; any `*Attention`
    module directly under a decoder layer here: Llama, Mistral, Qwen2/3, Gemma, OLMo, GPT-2)."""
    mods = [m for n, m in model.named_modules() if type(m).__name__.endswith("Attention") and
            n.rsplit(".", 1)[-1] in ("self_attn", "attn")]
    if not mods:
        raise ConfigError("defense=vaccine: the model has no self-attention modules named self_attn / attn.")
    return mods


class Vaccine:
    """Perturbation-aware alignment (Huang et al. 2024, git-disl/Vaccine `trainer.py`, VaccineTrainer).

    Per step: a first forward/backward on the alignment batch gives the gradient of the loss with respect to every
    attention block's output; the perturbation is rho * g / ||g|| (one norm over all blocks); a second forward adds
    it to the outputs, and that loss is what trains. The model learns to keep its alignment loss low under the
    worst-case embedding drift that harmful fine-tuning would cause. rho = 2, the value of the README's example.
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


class Booster:
    """Attenuating harmful perturbation (Huang et al. 2025, git-disl/Booster `trainer.py`,
    BoosterAlignmentTrainer.training_step, `perturb_aware` off).

    loss = alignment loss + lamb * (h(w) - h(w - alpha * grad h(w) / ||grad h(w)||)), h the loss on harmful pairs
    and the step direction held constant: the model is trained so that one normalised step of harmful fine-tuning
    reduces the harmful loss as little as possible. Its gradient is grad L + lamb * (grad h(w) - grad h(w')), as
    in the code. grad h(w) enters through the surrogate sum(p * g) (same gradient, no second pass), and h(w') is a
    forward pass at the perturbed weights (torch.func.functional_call), so every term flows through the masks.
    lamb = 5, alpha = 0.1: the defaults of its script/alignment/smooth_align.sh.
    """

    def __init__(self, harmful: BatchStream, lamb: float = 5.0, alpha: float = 0.1):
        if lamb < 0 or alpha < 0:
            raise ConfigError(f"defense.lamb and defense.alpha must be >= 0, got {lamb}, {alpha}.")
        self.harmful, self.lamb, self.alpha = harmful, float(lamb), float(alpha)
        self.last_terms: dict[str, float] = {}

    def loss(self, module, batch) -> torch.Tensor:
        from torch.func import functional_call

        model = module.model
        params = _trainable(model)
        hb = self.harmful.next(batch["input_ids"].device)
        h = model(**hb).loss
        g = torch.autograd.grad(h, list(params.values()), allow_unused=True)
        g = {n: (torch.zeros_like(p) if gi is None else gi.detach()) for (n, p), gi in zip(params.items(), g)}
        norm = torch.sqrt(sum((gi.float() ** 2).sum() for gi in g.values())) + 1e-7
        perturbed = {n: p - (self.alpha / norm) * g[n] for n, p in params.items()}
        h_after = functional_call(model, perturbed, args=(), kwargs=hb).loss
        surrogate = sum((p * g[n]).sum() for n, p in params.items())  # its gradient is grad h(w)
        align = model(**batch).loss
        reduction = h.detach() - h_after
        loss = align + self.lamb * (reduction + surrogate - surrogate.detach())
        self.last_terms = {"defense/harmful_loss": float(h.detach()),
                           "defense/harmful_loss_reduction": float(reduction.detach())}
        return loss


class Lisa:
    """Lazy safety alignment (Huang et al. 2024, git-disl/Lisa `trainer.py`, ADMMTrainer, its `lisa` optimizer).

    Bi-state optimisation during fine-tuning: `alignment_steps` steps on alignment data (the user batch is set
    aside, as in check_mode), then `finetune_steps` on the user's data, repeated; it starts in the alignment state,
    as the code does. Each state adds the proximal term rho/2 * ||w - w_other||^2 towards the weights the other
    state ended with (both start at the loaded, aligned weights), from 10% of the run on (the code's warm-up).
    rho = 1, 100 alignment and 900 fine-tune steps: its script/finetune/lisa_poison_ratio.sh (scales set
    the step counts in proportion to their shorter runs).
    """

    def __init__(self, alignment: BatchStream, rho: float = 1.0, alignment_steps: int = 100,
                 finetune_steps: int = 900, warmup_share: float = 0.1):
        if rho < 0 or alignment_steps < 0 or finetune_steps < 1:
            raise ConfigError(f"defense=lisa needs rho >= 0, alignment_steps >= 0 and finetune_steps >= 1, got "
                              f"{rho}, {alignment_steps}, {finetune_steps}.")
        self.alignment, self.rho = alignment, float(rho)
        self.alignment_steps, self.finetune_steps, self.warmup_share = alignment_steps, finetune_steps, warmup_share
        self.state = "alignment" if alignment_steps else "finetune"
        self.steps = self.clock = 0
        self.anchors: dict[str, dict[str, torch.Tensor]] | None = None
        self.last_terms: dict[str, float] = {}

    def _start(self, model) -> None:
        snap = {n: p.detach().clone() for n, p in _trainable(model).items()}
        self.anchors = {"alignment": snap, "finetune": {n: t.clone() for n, t in snap.items()}}

    def proximal(self, model) -> torch.Tensor:
        """rho/2 * ||w - w_other||^2: the anchor is the weights the other state ended with."""
        if self.anchors is None:
            self._start(model)
        other = self.anchors["finetune" if self.state == "alignment" else "alignment"]
        return self.rho / 2 * sum(((p - other[n]) ** 2).sum() for n, p in _trainable(model).items())

    def _switch(self, model) -> None:
        ended = self.state  # the weights this state ended with anchor the next state
        self.anchors[ended] = {n: p.detach().clone() for n, p in _trainable(model).items()}
        self.state = "finetune" if ended == "alignment" else "alignment"
        self.clock = 0

    def loss(self, module, batch) -> torch.Tensor:
        model = module.model
        if self.anchors is None:
            self._start(model)
        limit = self.alignment_steps if self.state == "alignment" else self.finetune_steps
        if self.steps and self.clock and self.clock % limit == 0 and self.alignment_steps:
            self._switch(model)
        if self.state == "alignment":
            batch = self.alignment.next(batch["input_ids"].device)
        loss = model(**batch).loss
        total = max(1, module._total_steps() * module.trainer.accumulate_grad_batches)
        prox = self.proximal(model) if self.rho > 0 and self.steps > self.warmup_share * total else None
        self.steps += 1
        self.clock += 1
        self.last_terms = {"defense/alignment_state": float(self.state == "alignment")}
        if prox is None:
            return loss
        self.last_terms["defense/proximal"] = float(prox.detach())
        return loss + prox


def safeinstr_source(defense: DictConfig, data: DictConfig) -> tuple[str, dict]:
    """SafeInstr (Bianchi et al. 2024, safety-tuned-llamas): safety examples make up `defense.share` (~3%) of the
    fine-tuning data. Returns the source to add to data.sources, weighted so that its share of num_samples is
    `share` whatever the other sources' weights are."""
    share = float(defense.share)
    if not 0 < share < 1:
        raise ConfigError(f"defense.share must be in (0, 1), got {share}.")
    if data.get("num_samples") is None:
        raise ConfigError("defense=safeinstr needs data.num_samples (its share is a share of the sampled data).")
    src = dict(OmegaConf.to_container(defense.source, resolve=True))
    others = sum(float(s.get("weight", 1.0)) for s in data.sources.values())
    src["weight"] = share / (1 - share) * others
    return "safeinstr", src


def build_objective(defense: DictConfig | None, tokenizer, data: DictConfig, seed: int):
    """The training objective of `defense` (None: the plain language-modelling loss)."""
    if defense is None or defense.get("stage", "none") not in STAGES:
        raise ConfigError(f"defense.stage must be one of {STAGES}, got {None if defense is None else defense.get('stage')!r}.")
    name = defense.name
    stream = dict(batch_size=int(defense.get("batch_size") or data.batch_size),
                  max_length=int(defense.get("max_length") or data.max_length), seed=seed)
    if name == "vaccine":
        return Vaccine(rho=defense.rho)
    if name == "booster":
        return Booster(BatchStream(defense.harmful, tokenizer, where="defense.harmful", **stream),
                       lamb=defense.lamb, alpha=defense.alpha)
    if name == "lisa":
        return Lisa(BatchStream(defense.alignment, tokenizer, where="defense.alignment", **stream), rho=defense.rho,
                    alignment_steps=int(defense.alignment_steps), finetune_steps=int(defense.finetune_steps),
                    warmup_share=float(defense.warmup_share))
    return None

