"""`defense=lisa`: lazy safety alignment (Huang et al. 2024), following git-disl/Lisa `trainer.py`, ADMMTrainer and
its `lisa` optimizer. The proximal term is part of the one loss, so frozen entries stay exact."""

from __future__ import annotations

import torch

from safety_units.defenses.base import BatchStream, Defense, trainable_params
from safety_units.utils.errors import ConfigError


class LisaLoss:
    """Lisa's update rule. Bi-state optimisation during fine-tuning: `alignment_steps` steps on alignment data (the
    user batch is set aside, as in check_mode), then `finetune_steps` on the user's data, repeated; it starts in the
    alignment state, as the code does. Each state adds the proximal term rho/2 * ||w - w_other||^2 towards the
    weights the other state ended with (both start at the loaded, aligned weights), from `warmup_share` of the run on
    (the code's warm-up). With `cycles`, the step counts follow the run's length instead: `cycles` periods of
    ceil(total / cycles) steps, `alignment_share` of each (at least 1) in the alignment state -- the published run
    alternates 100 + 900 steps about twice over its 2000 steps, which a shorter run keeps by its shares.
    """

    def __init__(self, alignment: BatchStream, rho: float = 1.0, alignment_steps: int = 100,
                 finetune_steps: int = 900, warmup_share: float = 0.1, cycles: int | None = None,
                 alignment_share: float = 0.1):
        if rho < 0 or alignment_steps < 0 or finetune_steps < 1:
            raise ConfigError(f"defense=lisa needs rho >= 0, alignment_steps >= 0 and finetune_steps >= 1, got "
                              f"{rho}, {alignment_steps}, {finetune_steps}.")
        if cycles is not None and (cycles < 1 or not 0 < alignment_share < 1):
            raise ConfigError(f"defense=lisa needs cycles >= 1 and alignment_share in (0, 1), got {cycles}, "
                              f"{alignment_share}.")
        self.alignment, self.rho = alignment, float(rho)
        self.alignment_steps, self.finetune_steps, self.warmup_share = alignment_steps, finetune_steps, warmup_share
        self.cycles, self.alignment_share = cycles, alignment_share
        self.state = "alignment" if alignment_steps or cycles else "finetune"
        self.steps = self.clock = 0
        self.anchors: dict[str, dict[str, torch.Tensor]] | None = None
        self.last_terms: dict[str, float] = {}

    def _start(self, model) -> None:
        snap = {n: p.detach().clone() for n, p in trainable_params(model).items()}
        self.anchors = {"alignment": snap, "finetune": {n: t.clone() for n, t in snap.items()}}

    def proximal(self, model) -> torch.Tensor:
        """rho/2 * ||w - w_other||^2: the anchor is the weights the other state ended with."""
        if self.anchors is None:
            self._start(model)
        other = self.anchors["finetune" if self.state == "alignment" else "alignment"]
        return self.rho / 2 * sum(((p - other[n]) ** 2).sum() for n, p in trainable_params(model).items())

    def _switch(self, model) -> None:
        ended = self.state  # the weights this state ended with anchor the next state
        self.anchors[ended] = {n: p.detach().clone() for n, p in trainable_params(model).items()}
        self.state = "finetune" if ended == "alignment" else "alignment"
        self.clock = 0

    def steps_per_state(self, total: int) -> tuple[int, int]:
        """(alignment steps, fine-tune steps) of one period: the fixed counts, or `cycles` periods over `total`."""
        if self.cycles is None:
            return self.alignment_steps, self.finetune_steps
        period = max(2, -(-total // self.cycles))
        a = min(period - 1, max(1, round(self.alignment_share * period)))
        return a, period - a

    def loss(self, module, batch) -> torch.Tensor:
        model = module.model
        total = max(1, module._total_steps() * module.trainer.accumulate_grad_batches)
        if self.anchors is None:
            self._start(model)
            self.alignment_steps, self.finetune_steps = self.steps_per_state(total)
        limit = self.alignment_steps if self.state == "alignment" else self.finetune_steps
        if self.steps and self.clock and self.clock % limit == 0 and self.alignment_steps:
            self._switch(model)
        if self.state == "alignment":
            batch = self.alignment.next(batch["input_ids"].device)
        loss = model(**batch).loss
        prox = self.proximal(model) if self.rho > 0 and self.steps > self.warmup_share * total else None
        self.steps += 1
        self.clock += 1
        self.last_terms = {"defense/alignment_state": float(self.state == "alignment")}
        if prox is None:
            return loss
        self.last_terms["defense/proximal"] = float(prox.detach())
        return loss + prox


class Lisa(Defense):
    """Fine-tunes with LisaLoss, its alignment steps on the `alignment` sources. rho = 1, 100 alignment and 900
    fine-tune steps: its script/finetune/lisa_poison_ratio.sh (scales set the step counts in proportion to their
    shorter runs, or `cycles` + `alignment_share` scale them to the run). batch_size / max_length of the alignment
    batches: null takes data.batch_size / data.max_length."""

    def __init__(self, name: str = "lisa", stage: str = "finetune", rho: float = 1.0, alignment_steps: int = 100,
                 finetune_steps: int = 900, warmup_share: float = 0.1, alignment: dict | None = None,
                 batch_size: int | None = None, max_length: int | None = None, cycles: int | None = None,
                 alignment_share: float = 0.1):
        super().__init__(name, stage)
        self.rho, self.alignment_steps, self.finetune_steps = rho, alignment_steps, finetune_steps
        self.cycles, self.alignment_share = cycles, alignment_share
        self.warmup_share, self.alignment = warmup_share, alignment
        self.batch_size, self.max_length = batch_size, max_length

    def check_run(self, cfg) -> None:
        if cfg.get("ckpt_path"):
            raise ConfigError(f"defense={self.name} cannot resume from ckpt_path: its state and anchors are not "
                              f"checkpointed.")

    def training_objective(self, tokenizer, data, seed):
        stream = BatchStream(self.alignment, tokenizer, batch_size=int(self.batch_size or data.batch_size),
                             max_length=int(self.max_length or data.max_length), seed=seed,
                             where="defense.alignment")
        return LisaLoss(stream, rho=self.rho, alignment_steps=int(self.alignment_steps),
                        finetune_steps=int(self.finetune_steps), warmup_share=float(self.warmup_share),
                        cycles=None if self.cycles is None else int(self.cycles),
                        alignment_share=float(self.alignment_share))
