"""Post-hoc defenses (`defense=safelora`, `defense=antidote`): act on the fine-tuning update dW = W - W_aligned
(W_aligned: the weights as loaded) of each decoder layer's q/k/v/o/gate/up/down weight. `safelora_project` and
`antidote_prune` map dicts of dW to dicts of dW; `apply_posthoc` computes dW from a model and writes the result back;
`PostHocDefense` does that at the end of fit, before the export."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import lightning.pytorch as pl
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from safety_units.models.sharded import weights_sharded
from safety_units.data.chat import collate, encode_example
from safety_units.utils.errors import ConfigError, ModelError
from safety_units.models.lora import ADAPTER, LLAMA_TARGETS, effective_weight
from safety_units.models.loading import load_model
from safety_units.models.forward import eval_mode, forward_hooks, hidden_states
from safety_units.utils.ranks import RankedLogger
from safety_units.data.sources import Source, subsample

log = RankedLogger(__name__)

DEFENSES = ("safelora", "antidote")
_LAYER = re.compile(r"(^|\.)\d+\.")  # a decoder layer's index in a module name (`model.layers.3.`)


def alignment_matrix(aligned: Tensor, base: Tensor) -> Tensor:
    """C = V V^T / ||V||_F with V = W_aligned - W_base (float32; IBM/SafeLoRA model.py get_aligned_matrix). A zero V
    (the matrix did not change in alignment) gives C = 0: an empty alignment subspace, not 0/0."""
    v = aligned.float() - base.to(aligned.device).float()
    norm = torch.linalg.norm(v)
    return v @ v.T / norm if norm > 0 else torch.zeros(v.shape[0], v.shape[0], device=v.device)


def _cosine(a: Tensor, b: Tensor) -> float:  # flattened, float64; 0.0 when either is zero
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = torch.linalg.norm(a), torch.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def safelora_project(delta: dict[str, Tensor], aligned: dict[str, Tensor], base: dict[str, Tensor],
                     threshold: float = 0.5, select: str = "threshold",
                     num_layers: int = 10) -> tuple[dict[str, Tensor], dict]:
    """SafeLoRA (Hsu et al. 2024), following IBM/SafeLoRA model.py (`get_aligned_matrix`, `projected_weighted`).

    Per matrix: C = V V^T / ||V||_F (V = aligned - base), cos = cosine(C dW, dW) flattened; dW <- C dW on the
    matrices where cos <= threshold (select="threshold"), or on the `num_layers` lowest-cos ones (select="number";
    the code takes cos <= its num_layers-th smallest cos, which projects more on ties -- here ties go by dict order,
    so exactly min(num_layers, n) are projected; the code also rounds cos to 5 decimals, not done here). The code
    projects LoRA's B (B <- C B); with dW = s B A, C dW = s (C B) A, so projecting the merged update is the same
    thing, and it also applies to full fine-tuning. Computed on each dW's device. Returns the new dW (unprojected
    ones are the same tensors) and {cos: {name: cos}, projected: [names], n_projected, threshold, select,
    empty_alignment: [names with V = 0]}.
    """
    if select not in ("threshold", "number"):
        raise ValueError(f"select must be 'threshold' or 'number', got {select!r}")
    if select == "number" and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    missing = [n for n in delta if n not in aligned or n not in base]
    if missing:
        raise KeyError(f"safelora_project: no aligned / base weight for {missing}")

    def projected(name: str) -> Tensor:
        d = delta[name]
        return alignment_matrix(aligned[name].to(d.device), base[name].to(d.device)) @ d.float()

    cos = {name: _cosine(projected(name), delta[name]) for name in delta}
    if select == "threshold":
        chosen, thr = [n for n in delta if cos[n] <= threshold], float(threshold)
    else:
        chosen = sorted(delta, key=lambda n: cos[n])[:num_layers]  # sorted() is stable: ties in dict order
        thr = max((cos[n] for n in chosen), default=float("nan"))
    out = dict(delta)
    for name in chosen:  # C dW recomputed, not kept for every matrix: that would double the memory
        out[name] = projected(name).to(delta[name].dtype)
    empty = [n for n in delta if torch.equal(aligned[n], base[n].to(aligned[n].device, aligned[n].dtype))]
    report = {"cos": cos, "projected": [n for n in delta if n in set(chosen)], "n_projected": len(chosen),
              "threshold": thr, "select": select, "empty_alignment": empty}
    return out, report


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


def _bare(model: nn.Module) -> nn.Module:  # the HF model inside a PeftModel (names without `base_model.model.`)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def target_weights(model: nn.Module, modules: tuple[str, ...] = LLAMA_TARGETS) -> dict[str, nn.Module]:
    """{`model.layers.3.mlp.down_proj.weight`: module} for the decoder layers' Linear modules named in `modules`
    (last name part). A module with a LoRA adapter is peft's LoRA Linear (its `.weight` is the base weight;
    safety_units.models.lora.effective_weight gives W + dW); a PeftModel is named by its base model's names."""
    out = {}
    for name, mod in _bare(model).named_modules():
        if name.rsplit(".", 1)[-1] not in modules or not _LAYER.search(name):
            continue
        base = mod.get_base_layer() if isinstance(mod, LoraLayer) else mod
        if type(base) is not nn.Linear:
            raise ConfigError(f"post-hoc defense: {name} is a {type(base).__name__}; the defenses support "
                              f"torch.nn.Linear modules (Llama-style models).")
        out[f"{name}.weight"] = mod
    if not out:
        raise ConfigError(f"post-hoc defense: no decoder-layer Linear module named {list(modules)} in this model.")
    return out


def _adapted(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) and ADAPTER in module.lora_A and not module.merged


def _delta(module: nn.Module, start: Tensor, device) -> Tensor:
    """dW = W + s B A - W_aligned in float32; LoRA's s B A taken unrounded (not through a bf16 merged weight)."""
    w = module.weight.detach().to(device, torch.float32) - start.to(device, torch.float32)
    if _adapted(module):
        w += module.get_delta_weight(ADAPTER).detach().to(device, torch.float32)
    return w


@torch.no_grad()
def input_norms(model: nn.Module, batches) -> dict[str, Tensor]:
    """Wanda's ||X_j||_2 (float64 sums) per input column of every target weight over the tokens with attention_mask
    1 of `batches` (input_ids, attention_mask), in eval mode (no dropout). Antidote's WrappedGPT keeps the mean over
    sequences of ||X_j||^2: a constant factor per matrix, the same ranking. Forward hooks on the target modules
    (with LoRA, peft's Linear: the same input), removed also when a batch fails."""

    targets, bare = target_weights(model), _bare(model)
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


def _number(cfg, key: str, default, integer: bool, what: str, *checks):
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not all(c(v) for c in checks):
        raise ConfigError(f"defense.{key} must be {what}, got {v!r}.")
    return v


def check_config(cfg) -> dict:
    """The settings of a post-hoc defense config, checked (ConfigError naming the key). PostHocDefense calls it when
    it is built, so a bad value fails before training, not after it."""

    name, stage = cfg.get("name"), cfg.get("stage", "post")
    if name not in DEFENSES:
        raise ConfigError(f"defense.name must be one of {list(DEFENSES)} for a post-hoc defense, got {name!r}.")
    if stage != "post":
        raise ConfigError(f"defense.stage: defense={name} runs after fine-tuning (stage: post), got {stage!r}.")
    if name == "safelora":
        select = cfg.get("select", "threshold")
        if select not in ("threshold", "number"):
            raise ConfigError(f"defense.select must be 'threshold' or 'number', got {select!r}.")
        if cfg.get("base") is None:
            raise ConfigError("defense.base: defense=safelora needs the aligned model's base model (a model config, "
                              "e.g. model@defense.base=hf defense.base.path=<dir>).")
        return {"name": name, "select": select, "threshold": float(_number(cfg, "threshold", 0.5, False, "a number")),
                "num_layers": _number(cfg, "num_layers", 10, True, "an integer >= 1", lambda v: v >= 1)}
    ratio = _number(cfg, "dense_ratio", 0.1, False, "in (0, 1]", lambda v: 0 < v <= 1)
    out = {"name": name, "dense_ratio": float(ratio)}
    out.update({k: _number(cfg, k, None, True, "a positive integer", lambda v: v >= 1)
                for k in ("nsamples", "max_length", "batch_size")})
    if not cfg.get("harmful"):
        raise ConfigError("defense.harmful: defense=antidote needs harmful calibration data (a dict of sources).")
    out["harmful"] = [Source.from_config(c, f"defense.harmful.{k}") for k, c in cfg.get("harmful").items()]
    return out


def harmful_batches(cfg, tokenizer) -> list[dict]:
    """Antidote's calibration batches: `cfg.harmful` sources (prompt + harmful response, chat template), at most
    `cfg.nsamples` examples (a seeded subset), `cfg.max_length` tokens, `cfg.batch_size` per batch."""

    c = check_config(cfg)
    examples = [ex for src in c["harmful"] for ex in src.load(seed=0, require_response=True)]
    if len(examples) > c["nsamples"]:
        examples = subsample(examples, c["nsamples"], "defense.harmful")
    enc = [encode_example(tokenizer, ex.messages, c["max_length"]) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [collate(enc[i:i + c["batch_size"]], pad) for i in range(0, len(enc), c["batch_size"])]


def _base_weights(cfg, start: dict[str, Tensor]) -> dict[str, Tensor]:
    """SafeLoRA's W_base: the target weights of the `defense.base` model config, checked against W_aligned."""

    try:
        model = load_model(cfg.get("base")).model
    except (ModelError, ConfigError) as e:
        raise ConfigError(f"defense.base: {e}") from None
    base = {n: m.weight.detach() for n, m in target_weights(model).items()}
    bad = [n for n in start if n not in base or base[n].shape != start[n].shape]
    if bad:
        have = tuple(base[bad[0]].shape) if bad[0] in base else "absent"
        raise ConfigError(f"defense.base: the base model's weights do not match: {bad[0]} is {have} there, "
                          f"{tuple(start[bad[0]].shape)} here.")
    if all(torch.equal(base[n], start[n].to(base[n].dtype)) for n in start):
        raise ConfigError("defense.base has the same weights as the model that was fine-tuned, so the alignment "
                          "matrix V = W_aligned - W_base is 0; give the base model of the aligned model.")
    return base


@torch.no_grad()
def apply_posthoc(model: nn.Module, start: dict[str, Tensor], cfg, tokenizer, device) -> dict:
    """Apply the defense `cfg.name` to `model` (HF model, with LoRA layers or a PeftModel) in place; returns the
    report. dW = effective weight - start; matrices with dW = 0 (not trained: frozen layers, no adapter) are left out.
    * full weights: SafeLoRA W <- W_aligned + C dW on projected matrices; Antidote W_ij <- W_aligned_ij (exactly) on
      pruned entries. Everything else stays bit-identical.
    * LoRA: SafeLoRA lora_B <- C lora_B on projected modules (exactly C dW, the adapter carries it). Antidote
      subtracts the pruned dW entries from the frozen base weight, so the merged weight equals W_aligned there (up
      to rounding in the base dtype); the PEFT adapter alone then does not carry the pruning, the merged export does.
    """
    c = check_config(cfg)
    name = c["name"]
    targets = target_weights(model)
    if set(start) - set(targets):
        raise ValueError(f"apply_posthoc: the model lacks snapshot weights {sorted(set(start) - set(targets))}")
    delta = {n: _delta(targets[n], start[n], device) for n in start}
    delta = {n: d for n, d in delta.items() if bool(d.any())}
    if name == "safelora":
        base = _base_weights(cfg, start)
        new, report = safelora_project(delta, start, base, c["threshold"], c["select"], c["num_layers"])
        changed = report["projected"]
    else:
        batches = harmful_batches(cfg, tokenizer)
        new, report = antidote_prune(delta, input_norms(model, batches), c["dense_ratio"])
        report["calibration_tokens"] = int(sum(int(b["attention_mask"].sum()) for b in batches))
        changed = list(new)
    for n in changed:
        mod, d, s, lora = targets[n], delta[n], start[n], _adapted(targets[n])
        w = mod.get_base_layer().weight if lora else mod.weight
        if name == "safelora" and lora:
            if not torch.equal(w.detach().cpu(), s.to(w.dtype)):  # C (s B A) = s (C B) A needs W = W_aligned
                raise RuntimeError(f"safelora: the base weight of {n} moved during training; cannot project B.")
            b = mod.lora_B[ADAPTER].weight
            cm = alignment_matrix(s.to(device), base[n].to(device))
            b.copy_((cm @ b.to(device, torch.float32)).to(b.device, b.dtype))
        elif name == "safelora":
            w.copy_((s.to(device, torch.float32) + new[n]).to(w.device, w.dtype))
        else:
            pruned = ((new[n] == 0) & (d != 0)).to(w.device)
            if lora:  # merged = (W - dW_ij) + dW_ij = W_aligned_ij
                w[pruned] = (w[pruned].float() - d.to(w.device)[pruned]).to(w.dtype)
            else:
                w[pruned] = s.to(w.device, w.dtype)[pruned]
    report.update(defense=name, targets=len(targets), trained=len(delta))
    return report


def summary_line(r: dict) -> str:
    if r["defense"] == "safelora":
        return (f"defense=safelora: projected {r['n_projected']}/{r['trained']} weight updates onto the alignment "
                f"subspace (select={r['select']}, cos <= {r['threshold']:.4g})")
    return (f"defense=antidote: reset {r['n_pruned']:,} of {r['n_entries']:,} update entries "
            f"({r['removed_norm_share']:.1%} of ||dW||) to W_aligned; Wanda on {r['calibration_tokens']:,} tokens")


class PostHocDefense(pl.Callback):
    """Snapshot W_aligned at setup, apply the defense `cfg` at the end of fit (before FinalizeRun, the export).
    `self.report`: the report (rank zero)."""

    def __init__(self, cfg, tokenizer=None):
        check_config(cfg)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.start, self.report = None, {}  # {name: W_aligned (CPU)}, the report

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Taken here, not at on_fit_start: Lightning restores a checkpoint's weights between the two (ckpt_path
        # resume), and the snapshot must be W_aligned as loaded. CPU copies; a single copy on rank zero.
        if stage != "fit":
            return
        if weights_sharded(trainer.strategy):
            raise ConfigError(f"defense={self.cfg.get('name')} needs the whole model on one rank; it does not run "
                              f"under {type(trainer.strategy).__name__} (use a single device, DDP or ZeRO-1/2).")
        if trainer.is_global_zero:
            self.start = {n: effective_weight(m).detach().to("cpu", copy=True)
                          for n, m in target_weights(pl_module.model).items()}

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # the export reads rank zero's weights
            return
        self.report = apply_posthoc(pl_module.model, self.start, self.cfg,
                                    self.tokenizer or getattr(pl_module, "tokenizer", None), pl_module.device)
        log.info(summary_line(self.report))
        key = "n_projected" if self.report["defense"] == "safelora" else "n_pruned"
        for lg in trainer.loggers:
            lg.log_metrics({f"defense/{key}": float(self.report[key])}, step=trainer.global_step)
