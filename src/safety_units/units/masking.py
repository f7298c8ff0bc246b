"""Exact gradient masks: every frozen entry stays bit-identical.

A freezing strategy (safety_units.training.freezing) picks units to freeze -- or, for `ru_only` / `train_only`, the only
units to train. Each unit-bearing parameter then gets a 0/1 vector `keep` along its unit dimension; parameters that
end up wholly frozen get `requires_grad=False` (no gradient, no optimizer state, no decay).

How exactness is kept:
* gradients: `hook` mechanism (single device, DDP, DeepSpeed ZeRO-1/2/3) multiplies each gradient by `keep` in a
  tensor hook, which runs before accumulation, DDP all-reduce and DeepSpeed's reduction. The `forward`
  mechanism (FSDP, whose flat parameters never call tensor hooks) routes the weight through an identity op whose
  backward multiplies by `keep`. Either way clipping sees the masked gradient.
* Adam: a frozen entry's gradient is exactly 0 at every step, so its moments stay 0 and its update is 0.
* decoupled weight decay (AdamW would shrink frozen entries too): partially masked parameters sit in an optimizer
  group with weight_decay=0 and the masker applies `p *= 1 - lr * wd * keep` itself before each optimizer step --
  exactly 1.0 on frozen entries. Under DeepSpeed this acts on the fp32 master partitions, under FSDP on the
  gathered full parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from safety_units.utils.errors import ConfigError, UnitMapError
from safety_units.utils.ranks import RankedLogger
from safety_units.units.groups import LINEAR_SUBCLASSES, resolve_units
from safety_units.units.layouts import has_heads, with_heads

log = RankedLogger(__name__)


@dataclass
class PartialMask:
    name: str
    dim: int
    keep: torch.Tensor  # bool over the unit dimension (True = trainable); [experts, dim] for a 3-D expert tensor
    shape: tuple = ()
    _views: dict = field(default_factory=dict, repr=False)

    def view(self, device, dtype) -> torch.Tensor:
        """`keep` as a 0/1 tensor broadcastable against the full parameter, cached per device/dtype."""
        key = (str(device), dtype)
        if key not in self._views:
            shape = [1] * len(self.shape)
            shape[self.dim] = self.keep.shape[-1]
            if self.keep.ndim == 2:  # an expert tensor: dimension 0 is the expert axis
                shape[0] = self.keep.shape[0]
            self._views[key] = self.keep.to(device=device, dtype=dtype).view(shape)
        return self._views[key]

    def frozen_index(self) -> torch.Tensor:  # 1-D masks (a Linear's rows or columns: LoRA)
        return torch.nonzero(~self.keep).flatten()

    def trainable_index(self) -> torch.Tensor:
        return torch.nonzero(self.keep).flatten()

    def frozen_values(self, t: torch.Tensor) -> torch.Tensor:
        """The entries of `t` (shaped like the parameter) that the mask freezes, flat."""
        return t.masked_select(~self.view(t.device, torch.bool).expand(t.shape))

    def trainable_values(self, t: torch.Tensor) -> torch.Tensor:
        return t.masked_select(self.view(t.device, torch.bool).expand(t.shape))


class _MaskGrad(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by `keep` in backward (FSDP-safe masking)."""

    @staticmethod
    def forward(ctx, w, keep):
        ctx.save_for_backward(keep)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return g * keep, None


class Masker:
    def __init__(self, model: nn.Module, partial: dict[str, PartialMask], frozen_full: set[str],
                 mechanism: str = "auto", description: dict | None = None, check_every_n_steps: int = 0,
                 selection: dict[str, torch.Tensor] | None = None, mode: str = "freeze"):
        if mechanism not in ("auto", "hook", "forward"):
            raise ConfigError(f"freeze.mechanism must be auto, hook or forward, got {mechanism!r}.")
        self.partial, self.frozen_full = partial, frozen_full
        # The unit selection the masks came from (exported beside the model); mode as in masks_from_selection.
        self.selection, self.mode = selection, mode
        self.mechanism = mechanism
        self.check_every_n_steps = check_every_n_steps
        self._description = description or {}
        self._handles: list = []
        self._patched: list = []
        params = dict(model.named_parameters())
        for name in frozen_full:
            params[name].requires_grad_(False)
        if not any(p.requires_grad and (n not in partial or partial[n].keep.any()) for n, p in params.items()):
            raise ConfigError("the freeze strategy leaves nothing trainable (empty trainable set).")
        # Snapshot of every frozen entry in the dtype the model was loaded in (CPU, compared at the end).
        self.snapshot = {n: params[n].detach().cpu().clone() for n in frozen_full}
        self.snapshot_partial = {n: m.frozen_values(params[n].detach().cpu()) for n, m in partial.items()}
        # A few trainable slices, to prove that training moved them.
        self.trainable_probe = {n: m.trainable_values(params[n].detach().cpu())
                                for n, m in list(partial.items())[:4] if m.keep.any()}
        if not self.trainable_probe:
            self.trainable_probe = {n: p.detach().cpu().clone() for n, p in list(params.items())
                                    if p.requires_grad and n not in partial and p.numel() < 5_000_000}
            self.trainable_probe = dict(list(self.trainable_probe.items())[:4])

    # ------------------------------------------------------------------ setup on each process
    def attach(self, model: nn.Module, strategy=None) -> None:
        """Install the masks on this process' model (idempotent)."""
        self.detach()
        mech = self.mechanism
        if mech == "auto":
            mech = "forward" if is_fsdp(strategy) else "hook"
        self.active_mechanism = mech
        # By unwrapped name: Lightning may call this after FSDP's auto-wrap put `_fsdp_wrapped_module.` into the
        # names (trainer.validate after fit), or on a model nested in a wrapper.
        params = _resolve_params(model, self.partial)
        if mech == "hook":
            for name, m in self.partial.items():
                p = params[name]
                self._handles.append(p.register_hook(lambda g, m=m: g * m.view(g.device, g.dtype)))
        else:
            owners = {id(mod.weight): mod for mod in model.modules() if isinstance(getattr(mod, "weight", None), nn.Parameter)}
            owners.update({id(mod.bias): mod for mod in model.modules() if isinstance(getattr(mod, "bias", None), nn.Parameter)})
            by_module: dict[int, tuple[nn.Module, dict]] = {}
            for name, m in self.partial.items():
                mod = owners.get(id(params[name]))
                if mod is None:
                    raise ConfigError(f"freeze.mechanism=forward masks the weights of Linear and Conv1D modules; "
                                      f"{name} is a parameter of {_owner(model, name)} (MoE experts' 3-D tensors: "
                                      f"train with the hook mechanism -- one device, DDP or DeepSpeed -- rather "
                                      f"than FSDP).")
                attr = "weight" if mod.weight is params[name] else "bias"
                by_module.setdefault(id(mod), (mod, {}))[1][attr] = m
            for mod, masks in by_module.values():
                self._patch_forward(mod, masks)

    def _patch_forward(self, mod: nn.Module, masks: dict[str, PartialMask]) -> None:
        kind = type(mod).__name__
        if kind not in ("Linear", *LINEAR_SUBCLASSES, "Conv1D"):
            raise ConfigError(f"freeze.mechanism=forward supports Linear and Conv1D modules, not {kind} (MoE "
                              f"experts' 3-D tensors: train with the hook mechanism -- one device, DDP or "
                              f"DeepSpeed -- rather than FSDP).")

        def masked(attr):
            t = getattr(mod, attr)
            if t is None or attr not in masks:
                return t
            return _MaskGrad.apply(t, masks[attr].view(t.device, t.dtype))

        if kind != "Conv1D":
            def forward(x):
                return nn.functional.linear(x, masked("weight"), masked("bias"))
        else:  # GPT-2 Conv1D: weight is (in, out)
            def forward(x):
                size_out = x.size()[:-1] + (mod.nf,)
                y = torch.addmm(masked("bias"), x.view(-1, x.size(-1)), masked("weight"))
                return y.view(size_out)
        mod.forward = forward
        self._patched.append(mod)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for mod in self._patched:
            del mod.forward  # back to the class forward
        self._patched = []

    def __getstate__(self):  # hook handles and patched modules belong to one process
        state = self.__dict__.copy()
        state["_handles"], state["_patched"] = [], []
        for m in state["partial"].values():
            m._views = {}
        return state

    # ------------------------------------------------------------------ optimizer side
    def partially_masked_params(self, model: nn.Module) -> set[int]:
        return {id(p) for p in _resolve_params(model, self.partial).values()}

    @torch.no_grad()
    def apply_masked_weight_decay(self, optimizer, model: nn.Module, strategy=None) -> None:
        """Decoupled weight decay on trainable entries only, for the parameters the optimizer does not decay."""
        groups = [g for g in optimizer.param_groups if g.get("masked_weight_decay", 0.0) > 0]
        if not groups:
            return
        lr, wd = groups[0]["lr"], groups[0]["masked_weight_decay"]
        name = type(strategy).__name__ if strategy is not None else ""
        params = live_params(model)
        if name == "DeepSpeedStrategy":
            self._decay_deepspeed(strategy, params, lr, wd)
        elif is_fsdp(strategy):
            self._decay_fsdp(strategy, model, lr, wd)
        else:
            for n, m in self.partial.items():
                p = params[n]
                if p.requires_grad:
                    p.mul_((1.0 - lr * wd * m.view(p.device, torch.float32)).to(p.dtype))

    def _decay_deepspeed(self, strategy, params, lr, wd) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        engine = strategy.deepspeed_engine
        if not engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed steps only at the boundary; Lightning calls this hook every micro-batch
        for n, m in self.partial.items():
            p = params[n]
            if not p.requires_grad:
                continue
            master = safe_get_full_fp32_param(p)  # collective under ZeRO-3
            if master is None:
                raise ConfigError(f"DeepSpeed holds no fp32 master for {n}; masked weight decay needs ZeRO 1-3.")
            master.mul_(1.0 - lr * wd * m.view(master.device, torch.float32))
            safe_set_full_fp32_param(p, master)

    def _decay_fsdp(self, strategy, model, lr, wd) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(strategy.model, writeback=True, with_grads=False):
            params = live_params(model)
            for n, m in self.partial.items():
                p = params[n]
                if p.requires_grad:
                    p.mul_((1.0 - lr * wd * m.view(p.device, torch.float32)).to(p.dtype))

    # ------------------------------------------------------------------ checks
    @property
    def has_frozen_entries(self) -> bool:
        return bool(self.snapshot) or any((~m.keep).any() for m in self.partial.values())

    def frozen_max_abs_delta(self, state_dict: dict[str, torch.Tensor]) -> float:
        """max |current - loaded| over every frozen entry; 0.0 means bit-identical (compared in the load dtype)."""
        worst = 0.0
        for n, ref in self.snapshot.items():
            cur = _lookup(state_dict, n).detach().cpu().to(ref.dtype)
            worst = max(worst, _max_abs_diff(cur, ref))
        for n, ref in self.snapshot_partial.items():
            m = self.partial[n]
            cur = m.frozen_values(_lookup(state_dict, n).detach().cpu().to(ref.dtype))
            worst = max(worst, _max_abs_diff(cur, ref))
        return worst

    def trainable_changed(self, state_dict: dict[str, torch.Tensor]) -> bool:
        for n, ref in self.trainable_probe.items():
            cur = _lookup(state_dict, n).detach().cpu().to(ref.dtype)
            if n in self.partial:
                cur = self.partial[n].trainable_values(cur)
            if not torch.equal(cur, ref):
                return True
        return False

    def describe(self) -> dict:
        return self._description


def _owner(model: nn.Module, name: str) -> str:
    """The class name of the module that holds parameter `name`."""
    try:
        return type(model.get_submodule(name.rpartition(".")[0])).__name__
    except AttributeError:
        return "a module that is not a Linear"


def is_fsdp(strategy) -> bool:
    """Lightning's FSDPStrategy (and subclasses): flat, possibly sharded parameters; masks act in forward."""
    return strategy is not None and "FSDP" in type(strategy).__name__


def live_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """named_parameters with wrapper prefixes (FSDP, activation checkpointing, torch.compile) removed."""
    out = {}
    for n, p in model.named_parameters():
        for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
            n = n.replace(junk, "")
        out[n] = p
    return out


def _resolve_params(model: nn.Module, names) -> dict[str, nn.Parameter]:
    """{name: parameter} for the unwrapped-model `names`, on `model` as it is now: wrapper prefixes inside the names
    are dropped (live_params), and a name found only under an outer prefix (`model.`, `module.`, `_forward_module.`:
    a model nested in a wrapper) is matched by its dotted suffix when exactly one parameter ends with it."""
    live = live_params(model)
    out = {}
    for name in names:
        p = live.get(name)
        if p is None:
            hits = [q for k, q in live.items() if k.endswith("." + name)]
            if len(hits) != 1:
                hint = "; under FSDP, masks need use_orig_params=True" if any("flat_param" in k for k in live) else ""
                raise KeyError(f"parameter {name} not found in the model ({len(hits)} matches{hint})")
            p = hits[0]
        out[name] = p
    return out


def _lookup(sd: dict, name: str) -> torch.Tensor:
    if name in sd:
        return sd[name]
    for prefix in ("model.", "module.", "_forward_module.model."):
        if prefix + name in sd:
            return sd[prefix + name]
    raise KeyError(f"parameter {name} not found in the state dict")


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    if torch.equal(a, b):
        return 0.0
    return float((a.double() - b.double()).abs().max())


# --------------------------------------------------------------------------- masks from a unit selection
def count_entries(model: nn.Module, partial: dict[str, PartialMask], frozen_full: set[str]) -> dict:
    total = frozen = 0
    for n, p in model.named_parameters():
        total += p.numel()
        if n in frozen_full:
            frozen += p.numel()
        elif n in partial:
            m = partial[n]
            frozen += int((~m.keep).sum()) * (p.numel() // m.keep.numel())
    return {"frozen": frozen, "trainable": total - frozen, "total": total,
            "frozen_share": round(frozen / total, 5), "trainable_share": round((total - frozen) / total, 5)}


def masks_from_selection(model: nn.Module, selection: dict[str, torch.Tensor], mode: str,
                         names: dict | None = None) -> tuple[dict[str, PartialMask], set[str]]:
    """mode 'freeze': selected units are frozen. mode 'train_only': only selected units train, all else frozen."""
    if mode not in ("freeze", "train_only"):
        raise ConfigError(f"mask mode must be 'freeze' or 'train_only', got {mode!r}.")
    groups = resolve_units(model, with_heads(names, has_heads(selection)))
    params = dict(model.named_parameters())
    keeps: dict[str, tuple[int, torch.Tensor]] = {}  # per parameter; a fused q/k/v has three slices
    for g in groups:
        sel = selection.get(g.key)
        if sel is None:
            raise UnitMapError(f"the selection has no entry for {g.key}; the unit map does not match this model.")
        if sel.numel() != g.n:
            raise UnitMapError(f"{g.key}: the unit map has {sel.numel()} units but the model has {g.n}.")
        units_keep = ~sel.bool() if mode == "freeze" else sel.bool().clone()
        for s in g.slices:
            keep = s.place(s.entries(units_keep, "all"), True)  # a shared K/V block trains only when all its heads do
            keeps[s.name] = (s.dim, keep & keeps[s.name][1] if s.name in keeps else keep)
    partial: dict[str, PartialMask] = {}
    frozen_full: set[str] = set()
    for name, (dim, keep) in keeps.items():
        if not keep.any():
            frozen_full.add(name)
        elif not keep.all():
            partial[name] = PartialMask(name, dim, keep.clone(), tuple(params[name].shape))
    if mode == "train_only":
        frozen_full |= {n for n in params if n not in keeps}
    return partial, frozen_full


# --------------------------------------------------------------------------- ablation: the same units, zeroed
def ablate_units(model, selection: dict[str, torch.Tensor], names: dict | None = None) -> dict:
    """Zero every parameter slice of the selected units (rows of gate/up, columns of down/o_proj; a head's q rows
    and o columns, and its K/V rows when every head of its group is selected -- not q/k rows under a norm that spans
    every head; an expert channel's entries of its expert's 3-D tensors)."""
    zeroed = {"units_zeroed": 0, "entries_zeroed": 0}
    groups = resolve_units(model, with_heads(names, has_heads(selection)))
    missing = sorted(set(selection) - {g.key for g in groups})
    if missing:
        raise UnitMapError(f"the unit selection has keys this model's units do not: {missing[:4]}")
    with torch.no_grad():
        for g in groups:
            sel = selection.get(g.key)
            if sel is None or not sel.any():
                continue
            zeroed["units_zeroed"] += int(sel.sum())
            for s in g.slices:
                if not s.ablate:
                    continue  # q/k rows under a norm that spans every head (safety_units.units.heads)
                gone = s.place(s.entries(sel.bool(), "all"), False)
                s.param.masked_fill_(s.broadcast(gone).to(s.param.device), 0.0)
                zeroed["entries_zeroed"] += int(gone.sum()) * (s.param.numel() // gone.numel())
    return zeroed
