"""The defense benchmark's tuning: each defense's grid (the `tune:` key of conf/defense/<d>.yaml), the cells read
back from a benchmark dir, and the choices written to <bench>/selection.json by the rules in criteria.py (from
validation data only): each defense's setting, then each defense's worst attack.

    tune:                         # in conf/defense/booster.yaml: override key -> values, the config's own first
      defense.lamb: [5.0, 1.0]
      defense.alpha: [0.1, 0.01]

A setting's tag names its values (`lamb1.0-alpha0.1`). `grid_points(d, "full")` is the product of the axes;
`"ofat"` varies one axis at a time around the config's own values, which is always a point; `"paired"` (the CPU
scale) moves every axis together, point i taking each axis's i-th value (lamb5.0-alpha0.1, lamb1.0-alpha0.01);
`"published"` (the peers_as_published scale) is no grid: each peer at its scripts' values (peers.py).
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from safety_units.experiments.defense_bench import criteria as C
from safety_units.experiments.defense_bench.cells import harm_flags
from safety_units.utils.errors import ConfigError

HARM_VAL, HARM_TEST, FA_VAL, FA_TEST = "beavertails_val", "beavertails", "sst2_val", "sst2"
SELECTION = "selection.json"


@lru_cache(maxsize=None)
def grid_axes(defense: str) -> tuple[tuple[str, tuple], ...]:
    """((override key, values), ...) of conf/defense/<defense>.yaml's `tune:`; the config's own value of each key
    comes first (added when the grid lacks it)."""
    from safety_units.utils.config import compose_config  # here: --list and the report need no config stack

    if defense.startswith("shrink_"):  # the matched-drift control: no config of its own, no grid
        return ()
    cfg = compose_config("train", ["~experiment", f"defense={defense}"])
    tune = cfg.defense.get("tune")
    if not tune:
        return ()
    axes = []
    for key, values in OmegaConf.to_container(tune, resolve=True).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"conf/defense/{defense}.yaml: tune.{key} must be a non-empty list of values.")
        own = OmegaConf.select(cfg, key, default=None)
        if own is None:
            raise ConfigError(f"conf/defense/{defense}.yaml: tune.{key} names no key of the train config.")
        axes.append((key, tuple(dict.fromkeys([own, *values]))))
    return tuple(axes)


def tag(point: dict) -> str:
    return "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in point.items())


def grid_points(defense: str, mode: str = "ofat") -> dict[str, list[str]]:
    """{tag: overrides} of a defense's grid; {"": []} for a defense without one. The config's own setting first."""
    axes = [] if mode == "published" else grid_axes(defense)
    if not axes:
        return {"": []}
    own = {k: vals[0] for k, vals in axes}
    if mode == "full":
        points = [dict(zip(own, combo)) for combo in itertools.product(*(vals for _, vals in axes))]
    elif mode == "ofat":
        points = [own] + [{**own, k: v} for k, vals in axes for v in vals[1:]]
    elif mode == "paired":  # point i takes every axis's i-th value (its own where an axis is shorter)
        width = max(len(vals) for _, vals in axes)
        points = [{k: vals[i] if i < len(vals) else vals[0] for k, vals in axes} for i in range(width)]
    else:
        raise ConfigError(f"grid mode must be 'ofat', 'paired', 'full' or 'published', got {mode!r}.")
    return {tag(p): [f"{k}={v}" for k, v in p.items()] for p in points}


def default_tag(defense: str) -> str:
    return next(iter(grid_points(defense, "ofat")))


# --------------------------------------------------------------------------- cells from a benchmark dir
def _split(ev: dict, harm: str, fa: str, flags: list[int]) -> dict:
    h, f = ev[harm], ev[fa]
    return {"harmful": flags, "asr": h["value"], "asr_outcomes": h["extra"]["outcomes"],
            "prompt_hash": h["extra"]["prompt_hash"], "n_harmful": h["n"],
            "overlaps_removed": h["extra"].get("overlaps_removed"),
            "fa": f["value"], "fa_outcomes": f["extra"]["outcomes"], "fa_majority": f["extra"]["majority"],
            "fa_n": f["n"]}


def cell_record(stage: Path, harm_judge) -> dict | None:
    """One evaluated stage as a cell (criteria's format), HS judged by `harm_judge` (cached per stage: judged);
    None when the stage has not finished."""
    if not (stage / "eval.json").is_file() or not (stage / "point.json").is_file():
        return None
    point = json.loads((stage / "point.json").read_text())
    ev = json.loads((stage / "eval.json").read_text())
    labels, train = point["labels"], point.get("train") or {}
    flags = harm_flags(stage, harm_judge)
    test = _split(ev, HARM_TEST, FA_TEST, flags[HARM_TEST])
    test |= {"overrefusal": ev["oktest"]["value"], "ppl": ev["ppl"]["value"]}
    return {"stage": point["name"], **{k: labels.get(k) for k in ("claim", "phase", "attack", "defense", "setting",
                                                                  "seed", "role")},
            "val": _split(ev, HARM_VAL, FA_VAL, flags[HARM_VAL]), "test": test,
            "delta_norm": train.get("delta_norm"), "train_seconds": train.get("train_seconds"),
            "stage_seconds": point.get("seconds"), "trainable": trainable_share(train),
            "defense_report": short_report(train.get("defense"))}


def trainable_share(train: dict) -> float | None:
    entries = (train.get("freeze") or {}).get("entries")
    return float(entries["trainable_share"]) if entries else 1.0


def short_report(report: dict | None) -> dict | None:
    if not report:
        return None
    inner = report.get("report") or {}
    return {"name": report.get("name"), **{k: v for k, v in inner.items() if not isinstance(v, (dict, list))}}


def read_cells(bench: Path, harm_judge) -> list[dict]:
    out = []
    for point in sorted(Path(bench).glob("*/point.json")):
        rec = cell_record(point.parent, harm_judge)
        if rec is not None:
            out.append(rec)
    return out


# --------------------------------------------------------------------------- the choices
def read_selection(bench: str | Path) -> dict:
    path = Path(bench) / SELECTION
    return json.loads(path.read_text()) if path.is_file() else {}


def choose(cells: list[dict], defenses: tuple[str, ...], controls: dict[str, str], attacks: list[str],
           seed: int, grid: str = "ofat") -> dict:
    """selection.json's content from the cells so far: {"settings": {defense: tag}, "tuning": {defense: the rule's
    record}, "worst_attack": {defense: attack}, "attacks": {defense: record}}; settings once every tuning cell
    (and aligned model) of seed `seed` exists, worst attacks once every attack cell does. `attacks`: the scale's
    attack keys, the protocol first; `grid`: the scale's grid mode (grid_points)."""
    protocol = attacks[0]
    fine = [c for c in cells if c["claim"] == "finetune" and c["seed"] == seed]
    aligned = {(c["defense"], c["setting"]): c for c in cells if c.get("role") == "aligned" and c["seed"] == seed}
    sft = next((c for c in fine if c["defense"] == C.SFT and c["attack"] == protocol), None)
    out: dict = {}
    tunable = [d for d in defenses if d not in controls]
    if sft is None:
        return out
    tuning, settings = {}, {}
    for d in tunable:
        expected = list(grid_points(d, grid))
        got = {c["setting"]: c for c in fine if c["defense"] == d and c["attack"] == protocol}
        if any(t not in got for t in expected):
            return out  # the tuning phase has not finished
        rejected = {}
        if (C.SFT, "") in aligned and any((d, t) in aligned for t in expected):
            rejected = {t: C.aligned_rejected(aligned[(d, t)], aligned[(C.SFT, "")])["rejected"] for t in expected
                        if (d, t) in aligned}
        rec = C.choose_setting([got[t] for t in expected], sft, rejected, default=expected[0])
        tuning[d], settings[d] = rec, rec["setting"]
    out |= {"settings": settings, "tuning": tuning}
    picks = carried(out, controls)
    worst, records = {}, {}
    for d, t in picks.items():
        mine = [c for c in fine if c["defense"] == d and c["setting"] == t and c["attack"] in attacks]
        if {c["attack"] for c in mine} != set(attacks):
            return out  # the attack phase has not finished
        rec = C.worst_attack(mine, protocol)
        worst[d], records[d] = rec["attack"], rec
    return out | {"worst_attack": worst, "attacks": records}


def carried(selection: dict, controls: dict[str, str]) -> dict[str, str]:
    """{defense: setting} carried into the attack and test phases: every defense whose grid has an eligible
    setting (criteria.choose_setting), and the controls of those. A defense with none is reported as failing at
    every grid point and stops after tuning: it cannot be the answer, and its seeds would cost the cpu budget."""
    keep = {d: t for d, t in (selection.get("settings") or {}).items() if d not in stopped(selection)}
    return keep | {c: keep[of] for c, of in controls.items() if of in keep}


def stopped(selection: dict) -> set[str]:
    """The defenses whose grid has no eligible setting (criteria.choose_setting): they stop after tuning."""
    return {d for d, r in (selection.get("tuning") or {}).items() if not r.get("eligible", True)}


def write_selection(bench: Path, selection: dict) -> bool:
    """Write selection.json when it changed; True when it did (the plan then grows)."""
    path = Path(bench) / SELECTION
    text = json.dumps(selection, indent=1, sort_keys=True)
    if path.is_file() and path.read_text() == text:
        return False
    path.write_text(text)
    return True
