"""Freezing strategies: which parameter entries a `freeze=` config leaves trainable (masks: safety_units.units.masking).

* esu, esu_cu: freeze ESU (+ the top CU by safety, freeze.total_share of units) of a unit map;
* ru_only: train only the RU units of a map;
* random: a seeded random unit set as large as freeze.like's selection, frozen or trained as that strategy does;
* train_only: train only freeze.classes of a map, or a seeded random freeze.random_share of each kind's units
  (a planted set, no map);
* layers: freeze whole decoder layers (freeze.layers, or freeze.layers_like=esu_cu: the contiguous middle layers
  with the closest number of entries, or freeze.layers_like=scans: the blocks SCANS anchors and steers).

"Train only" freezes everything outside the selected units: other units, embeddings, norms, q/k/v and lm_head.
"""

from __future__ import annotations


from torch import nn

from omegaconf import OmegaConf

from safety_units.utils.errors import ConfigError
from safety_units.units.masking import Masker, PartialMask, count_entries, masks_from_selection
from safety_units.utils.ranks import RankedLogger
from safety_units.attribution.selection import freeze_selection
from safety_units.units.unit_map import UnitMap, selection_size
from safety_units.units.groups import resolve_units, router_params
from safety_units.units.layouts import names_for, unit_names

log = RankedLogger(__name__)

STRATEGIES = ("none", "esu", "esu_cu", "ru_only", "random", "train_only", "layers")
ROUTER = ("train", "freeze")


def _layer_masks(cfg, model: nn.Module, tokenizer, names: dict | None, description: dict) -> tuple[dict, set[str]]:
    f = cfg.freeze
    groups = resolve_units(model, names)
    prefix = names_for(model, names)["layers"]  # OPT's blocks hold fc2 directly: no fixed depth below them
    n_layers = max(g.layer for g in groups) + 1
    if f.get("layers_like") == "scans":
        layer_ids = scans_layers(cfg, model, tokenizer, description)
    elif f.get("layers_like"):
        layer_ids = _middle_layers_like(cfg, model, tokenizer, names, prefix, n_layers, description)
    else:
        layer_ids = list(f.get("layers") or [])
    if not layer_ids:
        raise ConfigError("freeze=layers needs freeze.layers=[i, j, ...] (layer indices to freeze) or "
                          "freeze.layers_like=esu_cu (contiguous middle layers with as many frozen entries) or "
                          "freeze.layers_like=scans (the blocks steer=scans anchors).")
    bad = [i for i in layer_ids if not -n_layers <= i < n_layers]
    if bad:
        raise ConfigError(f"freeze.layers: {bad} out of range for a model with {n_layers} layers.")
    wanted = {f"{prefix}.{i % n_layers}." for i in layer_ids}
    description["layers"] = sorted(i % n_layers for i in layer_ids)
    partial: dict[str, PartialMask] = {}
    return partial, {n for n, _ in model.named_parameters() if any(n.startswith(w) for w in wanted)}


def scans_layers(cfg, model: nn.Module, tokenizer, description: dict) -> list[int]:
    """The blocks SCANS steers on this model (safety_units.steering.scans: anchored by vocabulary projection), from
    cfg.steer when it is steer=scans, else from conf/steer/scans.yaml's defaults (fitted once, cached)."""
    from safety_units.utils.config import compose_config  # here: only freeze.layers_like=scans composes a second config
    from safety_units.steering.steerer import build_steerer  # here: steering (and its data reads) only for this strategy
    from safety_units.steering.scans import ScansSteerer  # here: as above

    steerer = build_steerer(cfg.get("steer"))
    if not isinstance(steerer, ScansSteerer):
        steerer = build_steerer(compose_config("evaluate", ["steer=scans"]).steer)
    if tokenizer is None:
        raise ConfigError("freeze.layers_like=scans needs the tokenizer (it fits SCANS's vectors on the model).")
    layers = steerer.steered_layers(model, tokenizer)
    description.update(layers_like="scans")
    return layers


def _middle_layers_like(cfg, model: nn.Module, tokenizer, names, prefix: str, n_layers: int,
                        description: dict) -> list[int]:
    """The contiguous block of middle decoder layers whose parameter entries come closest to the entries that
    freeze=<layers_like> freezes (SPPFT-style safety-layer freezing at the same budget)."""
    like = cfg.freeze.layers_like
    if like not in ("esu", "esu_cu"):
        raise ConfigError(f"freeze.layers_like must be esu or esu_cu (a frozen unit set) or scans, got {like!r}.")
    like_cfg = OmegaConf.merge(cfg, {"freeze": {"strategy": like}})
    selection, _, _ = freeze_selection(like_cfg, model, tokenizer, names, {})
    target = count_entries(model, *masks_from_selection(model, selection, "freeze", names))["frozen"]
    per_layer = [sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"{prefix}.{i}."))
                 for i in range(n_layers)]

    def middle(size: int) -> range:
        return range((n_layers - size) // 2, (n_layers - size) // 2 + size)

    size = min(range(1, n_layers + 1), key=lambda n: abs(sum(per_layer[i] for i in middle(n)) - target))
    description.update(layers_like=like, like_entries=target)
    return list(middle(size))


def frozen_routers(cfg, model: nn.Module, names: dict | None) -> list[str]:
    """The MoE routers' parameters that `units.router=freeze` keeps fixed (tokens keep reaching the experts a
    frozen set was chosen in); [] for `train`, the default."""
    router = (cfg.get("units") or {}).get("router") or "train"
    if router not in ROUTER:
        raise ConfigError(f"units.router must be one of {ROUTER}, got {router!r}.")
    if router == "train":
        return []
    params = router_params(model, names)
    if not params:
        raise ConfigError("units.router=freeze: this model has no MoE router (units.names.expert.router); "
                          "use units.router=train.")
    return params


def build_masker(cfg, model: nn.Module, tokenizer=None) -> tuple[Masker | None, UnitMap | None]:
    """The Masker for cfg.freeze (None for `none`), and the unit map it used (None without one; `.path` is its
    file)."""
    f = cfg.freeze
    strategy = f.get("strategy", "none")
    if strategy not in STRATEGIES:
        raise ConfigError(f"freeze.strategy must be one of {STRATEGIES}, got {strategy!r}.")
    names = unit_names(cfg)
    routers = frozen_routers(cfg, model, names)
    if strategy == "none" and not routers:
        return None, None
    description: dict = {"strategy": strategy}
    unit_map = selection = None
    mode = "freeze"
    if strategy == "none":
        partial, frozen_full = {}, set()
    elif strategy == "layers":
        partial, frozen_full = _layer_masks(cfg, model, tokenizer, names, description)
    else:
        selection, mode, unit_map = freeze_selection(cfg, model, tokenizer, names, description)
        partial, frozen_full = masks_from_selection(model, selection, mode, names)
        description["units_" + ("trainable" if mode == "train_only" else "frozen")] = selection_size(selection)
        if unit_map is not None:
            description["unit_map"] = str(unit_map.path)
    if routers:
        frozen_full |= set(routers)
        description["router"] = "freeze"
    description["entries"] = count_entries(model, partial, frozen_full)
    masker = Masker(model, partial, frozen_full, mechanism=f.get("mechanism", "auto"), description=description,
                    check_every_n_steps=int(f.get("check_every_n_steps", 0) or 0), selection=selection, mode=mode)
    e = description["entries"]
    log.info("freeze=%s: %s frozen / %s trainable parameter entries (%.2f%% / %.2f%%); units: %s", strategy,
             f"{e['frozen']:,}", f"{e['trainable']:,}", 100 * e["frozen_share"], 100 * e["trainable_share"],
             description.get("units_frozen") or description.get("units_trainable") or description.get("layers"))
    return masker, unit_map
