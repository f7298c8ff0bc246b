"""`defense=antidote`: Antidote (Huang et al. 2024), following git-disl/Antidote utils.py `prune_wanda_outlier` and
train.py: after fine-tuning, prune the top Wanda-scored entries of what the fine-tune trained. `antidote_prune` maps
dicts of dW to dicts of dW; `UpdatePruning` is the post-hoc edit shared with the random control
(safety_units.defenses.random_prune); `Antidote` scores it with Wanda on harmful calibration data."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor, nn

from safety_units.data.chat import collate, encode_example
from safety_units.data.sources import Source, subsample
from safety_units.defenses.posthoc import (PostHocDefense, adapted, bare_model, checked_number, target_weights,
                                           update_of)
from safety_units.models.forward import eval_mode, forward_hooks, hidden_states
from safety_units.models.lora import ADAPTER
from safety_units.utils.errors import ConfigError

GRANULARITIES = ("row", "matrix")


def n_pruned(numel: int, dense_ratio: float) -> int:
    """granularity=matrix: ceil(dense_ratio * numel) over the whole matrix, with dense_ratio read as the decimal it
    was written as (0.1 is 1/10)."""
    return math.ceil(Fraction(repr(float(dense_ratio))) * numel)


def pruned_per_row(cols: int, dense_ratio: float) -> int:
    """granularity=row: the code's count per output row, cols - int(cols * (1 - dense_ratio)) in float arithmetic
    (prune_wanda_outlier keeps the int(cols * sparsity) lowest-scored entries of each row, sparsity = 1 - dense_ratio):
    576 columns at 0.1 -> 58, 8 -> 1, 576 at 1e-5 -> 1."""
    return cols - int(cols * (1 - float(dense_ratio)))


def prune_mask(score: Tensor, dense_ratio: float, granularity: str = "row") -> Tensor:
    """Boolean mask of the entries to prune of a 2-d `score`. row: the pruned_per_row highest of each row, ties to the
    higher column (the code's stable ascending sort, whose tail it masks); matrix: the n_pruned highest of the whole
    matrix, ties to the lower flat index."""
    if granularity == "row":
        keep = score.shape[1] - pruned_per_row(score.shape[1], dense_ratio)
        mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
        return mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, keep:], True)
    top = torch.sort(score.reshape(-1), descending=True, stable=True).indices[:n_pruned(score.numel(), dense_ratio)]
    return torch.zeros(score.numel(), dtype=torch.bool, device=score.device).index_fill_(0, top, True).view(score.shape)


def check_pruning(dense_ratio, granularity) -> None:
    """ValueError unless dense_ratio is in (0, 1] and granularity one of GRANULARITIES."""
    if isinstance(dense_ratio, bool) or not isinstance(dense_ratio, (int, float)) or not 0 < dense_ratio <= 1:
        raise ValueError(f"dense_ratio must be in (0, 1], got {dense_ratio!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def antidote_prune(delta: dict[str, Tensor], norms: dict[str, Tensor], dense_ratio: float = 0.1,
                   granularity: str = "row") -> tuple[dict[str, Tensor], dict]:
    """Wanda on the merged update: score_ij = |dW_ij| * ||X_j||_2 (`norms[name]`: ||X_j|| per input column,
    `input_norms`), the top entries (prune_mask: per row as prune_wanda_outlier, or over the matrix) reset to the
    aligned weights (dW_ij <- 0). Returns the new dW and {pruned: {name: count}, per_row: {name: count} (row),
    n_pruned, n_entries, dense_ratio, granularity, removed_norm_share = ||removed|| / ||dW|| over all matrices}."""
    check_pruning(dense_ratio, granularity)
    out, counts, removed, total = {}, {}, 0.0, 0.0
    for name, d in delta.items():
        x = norms[name].to(d.device, torch.float64)
        if d.dim() != 2 or x.shape != (d.shape[1],):
            raise ValueError(f"antidote_prune: {name} has dW {tuple(d.shape)} and norms {tuple(x.shape)}")
        mask = prune_mask(d.double().abs() * x[None, :], dense_ratio, granularity)
        removed, total = removed + float(d[mask].double().pow(2).sum()), total + float(d.double().pow(2).sum())
        out[name], counts[name] = d.masked_fill(mask, 0), int(mask.sum())
    report = {"pruned": counts, "n_pruned": sum(counts.values()), "n_entries": sum(d.numel() for d in delta.values()),
              "dense_ratio": float(dense_ratio), "granularity": granularity,
              "removed_norm_share": math.sqrt(removed / total) if total else 0.0}
    if granularity == "row":
        report["per_row"] = {n: pruned_per_row(d.shape[1], dense_ratio) for n, d in delta.items()}
    return out, report


@torch.no_grad()
def activation_norms(model: nn.Module, modules: dict[str, nn.Module], batches) -> dict[str, Tensor]:
    """Wanda's ||X_j||_2 (float64 sums) per input column of each of `modules` ({key: module}, hooked on its forward
    input) over the tokens with attention_mask 1 of `batches` (input_ids, attention_mask), in eval mode (no dropout).
    Antidote's WrappedGPT keeps the mean over sequences of ||X_j||^2: a constant factor per matrix, the same ranking.
    The hooks are removed also when a batch fails."""
    bare = bare_model(model)
    device = next(bare.parameters()).device
    sums, mask = {}, []  # float64 sums of x_j^2; the current batch's attention mask

    def hook(name):
        def fn(_mod, args, _out):
            x = args[0]
            s = (x[mask[0]] if x.shape[:-1] == mask[0].shape else x.reshape(-1, x.shape[-1])).double().pow(2).sum(0)
            sums[name] = sums[name] + s if name in sums else s
        return fn

    with forward_hooks({mod: hook(name) for name, mod in modules.items()}), eval_mode(bare):
        for batch in batches:
            ids = batch["input_ids"].to(device)
            att = batch.get("attention_mask", torch.ones_like(ids)).to(device)
            mask[:] = [att.bool()]
            hidden_states(bare, ids, att)  # the decoder only: the LM head's logits are not needed
    if len(sums) != len(modules):
        raise ValueError(f"activation_norms: no calibration tokens reached {sorted(set(modules) - set(sums))[:5]}")
    return {n: sums[n].sqrt() for n in modules}


def input_norms(model: nn.Module, batches) -> dict[str, Tensor]:
    """activation_norms of every target weight (with LoRA, peft's Linear: the layer input X)."""
    return activation_norms(model, target_weights(model), batches)


class Pruned(NamedTuple):
    """One tensor whose entries are pruned."""
    target: str  # the target weight it belongs to (target_weights' name)
    kind: str  # update: the merged dW, pruned entries reset to W_aligned | lora_A / lora_B: a LoRA factor, zeroed
    values: Tensor  # the float32 dW, or the factor's weight


def pruned_tensors(targets: dict[str, nn.Module], delta: dict[str, Tensor], granularity: str) -> dict[str, Pruned]:
    """What is pruned, by key: with granularity=row, the LoRA factors of an adapted module (keys as the bare
    model's parameters, `...q_proj.lora_A.default.weight`), as the code prunes the second LoRA; else the merged dW
    (key: the target's name)."""
    out = {}
    for n, d in delta.items():
        mod = targets[n]
        if granularity == "row" and adapted(mod):
            for kind, factor in (("lora_A", mod.lora_A), ("lora_B", mod.lora_B)):
                out[f"{n.removesuffix('.weight')}.{kind}.{ADAPTER}.weight"] = Pruned(n, kind, factor[ADAPTER].weight)
        else:
            out[n] = Pruned(n, "update", d)
    return out


class UpdatePruning(PostHocDefense):
    """Resets a share of what the fine-tune trained, chosen by `scores` (a subclass: Antidote's Wanda, the random
    control): `dense_ratio` of each output row (granularity=row, the code) or of each matrix (matrix).
    * full weights: the merged update dW, W_ij <- W_aligned_ij (exactly) on the pruned entries; the rest stays
      bit-identical.
    * LoRA, row: the LoRA factors themselves, A_ij <- 0 and B_ij <- 0 on the pruned entries (as the code; the PEFT
      adapter carries it).
    * LoRA, matrix: the merged dW; its pruned entries are subtracted from the frozen base weight, so the merged
      weight equals W_aligned there (up to rounding in the base dtype); the merged export carries it.
    """

    count_key = "n_pruned"

    def __init__(self, name: str, stage: str = "post", dense_ratio: float = 0.1, granularity: str = "row"):
        super().__init__(name, stage)
        self.dense_ratio = float(checked_number(dense_ratio, "dense_ratio", False, "in (0, 1]", lambda v: 0 < v <= 1))
        if granularity not in GRANULARITIES:
            raise ConfigError(f"defense.granularity must be one of {GRANULARITIES}, got {granularity!r}.")
        self.granularity = granularity

    def scores(self, model: nn.Module, targets: dict[str, nn.Module], tensors: dict[str, Pruned],
               tokenizer) -> tuple[dict[str, Tensor], dict]:
        """{key: score of each entry of tensors[key]} (higher: pruned first) and what to add to the report."""
        raise NotImplementedError

    def edit(self, model: nn.Module, targets: dict[str, nn.Module], start: dict[str, Tensor],
             delta: dict[str, Tensor], tokenizer, device) -> dict:
        tensors = pruned_tensors(targets, delta, self.granularity)
        scores, extra = self.scores(model, targets, tensors, tokenizer)
        masks = {k: prune_mask(scores[k].to(device), self.dense_ratio, self.granularity) for k in tensors}
        removed = 0.0
        for key, (n, kind, values) in tensors.items():
            mod = targets[n]
            if kind == "update":
                w = mod.get_base_layer().weight if adapted(mod) else mod.weight
                m = masks[key].to(w.device)
                if adapted(mod):  # merged = (W - dW_ij) + dW_ij = W_aligned_ij
                    w[m] = (w[m].float() - values.to(w.device)[m]).to(w.dtype)
                else:
                    w[m] = start[n].to(w.device, w.dtype)[m]
                removed += float(values.to(device)[masks[key]].double().pow(2).sum())
            else:
                values[masks[key].to(values.device)] = 0
        for n in {p.target for p in tensors.values() if p.kind != "update"}:  # dW - s B' A', after both factors
            removed += float((delta[n].to(device) - update_of(targets[n], start[n], device)).double().pow(2).sum())
        total = sum(float(d.double().pow(2).sum()) for d in delta.values())
        counts = {k: int(m.sum()) for k, m in masks.items()}
        report = {"pruned": counts, "n_pruned": sum(counts.values()),
                  "n_entries": sum(p.values.numel() for p in tensors.values()), "dense_ratio": self.dense_ratio,
                  "granularity": self.granularity, "pruned_kinds": sorted({p.kind for p in tensors.values()}),
                  "removed_norm_share": math.sqrt(removed / total) if total else 0.0, **extra}
        if self.granularity == "row":
            report["per_row"] = {k: pruned_per_row(p.values.shape[1], self.dense_ratio) for k, p in tensors.items()}
        return report

    def summary_line(self, r: dict) -> str:
        what = "update entries to W_aligned" if r["pruned_kinds"] == ["update"] else "LoRA-factor entries"
        return (f"defense={self.name}: pruned {r['n_pruned']:,} of {r['n_entries']:,} {what} (per "
                f"{r['granularity']}; {r['removed_norm_share']:.1%} of ||dW|| removed)")


class Antidote(UpdatePruning):
    """Wanda-scores what the fine-tune trained on `harmful` calibration data (prompt + harmful answer sources; at
    most `nsamples` examples of `max_length` tokens, `batch_size` a batch), as prune_wanda_outlier does:
    |dW_ij| * ||X_j|| for an update; for LoRA factors (granularity=row), |A_ij| * ||X_j|| with X the layer input and
    |B_ij| * ||(A X)_j|| with A X the LoRA intermediate activations -- the code hooks the lora_A / lora_B Linear
    modules (find_layers: "lora" in the name), whose inputs are X and A X (dropout 0 there, eval mode here).
    Deviations kept: full fine-tuning -- the code scores |W_ij| of the fine-tuned q/k/v weights and zeroes W_ij (at
    dense_ratio 1e-5, antidote_poison_ratio_full.sh); here |dW_ij| of every trained matrix is scored and reset to
    W_aligned, so the aligned model itself is never pruned. LoRA -- the code's adapters are on q/k/v (train.py:
    r 256, alpha 4); here every adapted module (adapter.target_modules) is pruned. Calibration -- the code runs
    bad_sample_num = 2000 harmful pairs one at a time, untruncated; here `nsamples` (64) of `max_length` tokens."""

    def __init__(self, name: str = "antidote", stage: str = "post", dense_ratio: float = 0.1,
                 granularity: str = "row", harmful: dict | None = None, nsamples: int | None = None,
                 max_length: int | None = None, batch_size: int | None = None):
        super().__init__(name, stage, dense_ratio, granularity)
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

    def scores(self, model, targets, tensors, tokenizer):
        batches = self.calibration_batches(tokenizer)
        hooked = {}  # the module whose forward input scores each tensor's columns
        for key, p in tensors.items():
            if p.kind == "lora_B":
                hooked[key] = targets[p.target].lora_B[ADAPTER]
            else:
                hooked[p.target] = targets[p.target]
        norms = activation_norms(model, hooked, batches)
        out = {}
        for key, p in tensors.items():
            x = norms[key if p.kind == "lora_B" else p.target].to(p.values.device)
            if p.values.dim() != 2 or x.shape != (p.values.shape[1],):
                raise ValueError(f"antidote: {key} is {tuple(p.values.shape)} with norms {tuple(x.shape)}")
            out[key] = p.values.detach().double().abs() * x[None, :]
        return out, {"calibration_tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))}

    def summary_line(self, r: dict) -> str:
        return super().summary_line(r) + f"; Wanda on {r['calibration_tokens']:,} tokens"
