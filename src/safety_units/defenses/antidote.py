"""`defense=antidote`: Antidote (Huang et al. 2024), following git-disl/Antidote utils.py `prune_wanda_outlier` and
train.py: after fine-tuning, prune the top Wanda-scored entries of the update back to the aligned weights.
`antidote_prune` maps dicts of dW to dicts of dW; `Antidote` applies it at the end of fit
(safety_units.defenses.posthoc)."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor, nn

from safety_units.data.chat import collate, encode_example
from safety_units.data.sources import Source, subsample
from safety_units.defenses.posthoc import PostHocDefense, adapted, bare_model, checked_number, target_weights
from safety_units.models.forward import eval_mode, forward_hooks, hidden_states
from safety_units.utils.errors import ConfigError


def n_pruned(numel: int, dense_ratio: float) -> int:
    """ceil(dense_ratio * numel), with dense_ratio read as the decimal it was written as (0.1 is 1/10): the code's
    per-row count cols - int(cols * (1 - dense_ratio)), applied to the whole matrix."""
    return math.ceil(Fraction(repr(float(dense_ratio))) * numel)


def antidote_prune(delta: dict[str, Tensor], norms: dict[str, Tensor],
                   dense_ratio: float = 0.1) -> tuple[dict[str, Tensor], dict]:
    """Antidote (Huang et al. 2024), following git-disl/Antidote utils.py `prune_wanda_outlier` and train.py.

    The code runs Wanda on harmful data (BeaverTails prompts + harmful answers) with the fine-tuned model, scores
    |W_ij| * ||X_j||_2, masks the top `dense_ratio` of each output row and zeroes them (`param *= 1 - bad_mask`): on
    the LoRA factors of the fine-tuned model, or (full_finetuning) on the q/k/v weights. Here the same Wanda score
    is taken on the fine-tuning update, score_ij = |dW_ij| * ||X_j||_2, and its top entries are pruned back to the
    aligned weights (dW_ij <- 0), as the issue asks ("prune the top Wanda-scored entries of the fine-tuning update"):
    it prunes the merged update, whatever the adapter, and never touches the aligned model itself. Exactly
    k = n_pruned(numel, dense_ratio) entries per matrix, taken over the whole matrix rather than per row; ties go to
    the lower flat index (a stable descending sort). `norms[name]` is ||X_j||_2 per input column (`input_norms`).
    Returns the new dW and {pruned: {name: k}, n_pruned, n_entries, dense_ratio, removed_norm_share}.
    """
    if isinstance(dense_ratio, bool) or not isinstance(dense_ratio, (int, float)) or not 0 < dense_ratio <= 1:
        raise ValueError(f"dense_ratio must be in (0, 1], got {dense_ratio!r}")
    out, counts, removed, total = {}, {}, 0.0, 0.0
    for name, d in delta.items():
        x = norms[name].to(d.device, torch.float64)
        if d.dim() != 2 or x.shape != (d.shape[1],):
            raise ValueError(f"antidote_prune: {name} has dW {tuple(d.shape)} and norms {tuple(x.shape)}")
        score = (d.double().abs() * x[None, :]).reshape(-1)
        top = torch.sort(score, descending=True, stable=True).indices[:n_pruned(d.numel(), dense_ratio)]
        new = d.clone().reshape(-1)
        removed, total = removed + float(new[top].double().pow(2).sum()), total + float(d.double().pow(2).sum())
        new[top] = 0
        out[name], counts[name] = new.reshape(d.shape), len(top)
    report = {"pruned": counts, "n_pruned": sum(counts.values()), "n_entries": sum(d.numel() for d in delta.values()),
              "dense_ratio": float(dense_ratio), "removed_norm_share": math.sqrt(removed / total) if total else 0.0}
    return out, report


@torch.no_grad()
def input_norms(model: nn.Module, batches) -> dict[str, Tensor]:
    """Wanda's ||X_j||_2 (float64 sums) per input column of every target weight over the tokens with attention_mask
    1 of `batches` (input_ids, attention_mask), in eval mode (no dropout). Antidote's WrappedGPT keeps the mean over
    sequences of ||X_j||^2: a constant factor per matrix, the same ranking. Forward hooks on the target modules
    (with LoRA, peft's Linear: the same input), removed also when a batch fails."""

    targets, bare = target_weights(model), bare_model(model)
    device = next(bare.parameters()).device
    sums, mask = {}, []  # float64 sums of x_j^2; the current batch's attention mask

    def hook(name):
        def fn(_mod, args, _out):
            x = args[0]
            s = (x[mask[0]] if x.shape[:-1] == mask[0].shape else x.reshape(-1, x.shape[-1])).double().pow(2).sum(0)
            sums[name] = sums[name] + s if name in sums else s
        return fn

    with forward_hooks({mod: hook(name) for name, mod in targets.items()}), eval_mode(bare):
        for batch in batches:
            ids = batch["input_ids"].to(device)
            att = batch.get("attention_mask", torch.ones_like(ids)).to(device)
            mask[:] = [att.bool()]
            hidden_states(bare, ids, att)  # the decoder only: the LM head's logits are not needed
    if len(sums) != len(targets):
        raise ValueError(f"input_norms: no calibration tokens reached {sorted(set(targets) - set(sums))[:5]}")
    return {n: sums[n].sqrt() for n in targets}


class Antidote(PostHocDefense):
    """Wanda-scores the update on `harmful` calibration data (prompt + harmful answer sources; at most `nsamples`
    examples of `max_length` tokens, `batch_size` a batch) and resets the top `dense_ratio` share of each matrix's
    entries to W_aligned.
    * full weights: W_ij <- W_aligned_ij (exactly) on the pruned entries; everything else stays bit-identical.
    * LoRA: the pruned dW entries are subtracted from the frozen base weight, so the merged weight equals W_aligned
      there (up to rounding in the base dtype); the PEFT adapter alone then does not carry the pruning, the merged
      export does.
    """

    count_key = "n_pruned"

    def __init__(self, name: str = "antidote", stage: str = "post", dense_ratio: float = 0.1,
                 harmful: dict | None = None, nsamples: int | None = None, max_length: int | None = None,
                 batch_size: int | None = None):
        super().__init__(name, stage)
        self.dense_ratio = float(checked_number(dense_ratio, "dense_ratio", False, "in (0, 1]", lambda v: 0 < v <= 1))
        positive = (True, "a positive integer", lambda v: v >= 1)
        self.nsamples = checked_number(nsamples, "nsamples", *positive)
        self.max_length = checked_number(max_length, "max_length", *positive)
        self.batch_size = checked_number(batch_size, "batch_size", *positive)
        if not harmful:
            raise ConfigError("defense.harmful: defense=antidote needs harmful calibration data (a dict of sources).")
        self.harmful = [Source.from_config(c, f"defense.harmful.{k}") for k, c in harmful.items()]

    def calibration_batches(self, tokenizer) -> list[dict]:
        """The `harmful` sources (prompt + harmful response, chat template), at most `nsamples` examples (a seeded
        subset), `max_length` tokens, `batch_size` per batch."""
        examples = [ex for src in self.harmful for ex in src.load(seed=0, require_response=True)]
        if len(examples) > self.nsamples:
            examples = subsample(examples, self.nsamples, "defense.harmful")
        enc = [encode_example(tokenizer, ex.messages, self.max_length) for ex in examples]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return [collate(enc[i:i + self.batch_size], pad) for i in range(0, len(enc), self.batch_size)]

    def edit(self, model: nn.Module, targets: dict[str, nn.Module], start: dict[str, Tensor],
             delta: dict[str, Tensor], tokenizer, device) -> dict:
        batches = self.calibration_batches(tokenizer)
        new, report = antidote_prune(delta, input_norms(model, batches), self.dense_ratio)
        report["calibration_tokens"] = int(sum(int(b["attention_mask"].sum()) for b in batches))
        for n in new:
            mod, d, s = targets[n], delta[n], start[n]
            w = mod.get_base_layer().weight if adapted(mod) else mod.weight
            pruned = ((new[n] == 0) & (d != 0)).to(w.device)
            if adapted(mod):  # merged = (W - dW_ij) + dW_ij = W_aligned_ij
                w[pruned] = (w[pruned].float() - d.to(w.device)[pruned]).to(w.dtype)
            else:
                w[pruned] = s.to(w.device, w.dtype)[pruned]
        return report

    def summary_line(self, r: dict) -> str:
        return (f"defense=antidote: reset {r['n_pruned']:,} of {r['n_entries']:,} update entries "
                f"({r['removed_norm_share']:.1%} of ||dW||) to W_aligned; Wanda on {r['calibration_tokens']:,} tokens")
