"""The plots of unit maps and drift (safety_units.utils.plots): a PNG of the expected size, one panel per unit kind,
each class in its colour."""
import struct
from types import SimpleNamespace

import numpy as np
from conftest import FIXTURES

from safety_units.units.unit_map import UnitMap
from safety_units.utils.plots import CLASS_COLORS, plot_drift, plot_units_per_layer

DPI = 110


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def colours(path) -> set[tuple[int, int, int]]:
    import matplotlib.image

    rgb = (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.uint8)
    return set(map(tuple, rgb.reshape(-1, 3).tolist()))


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_units_per_layer_draws_one_panel_per_unit_kind(tmp_path):
    um = UnitMap.load(FIXTURES / "unit_map_channels_v9a1b3aa_tiny.safetensors")  # mlp and attn units
    path = plot_units_per_layer(um, tmp_path / "units.png", title="tiny")
    assert path == tmp_path / "units.png" and png_size(path) == (10 * DPI, round(2 * 3.2 * DPI))
    one_kind = SimpleNamespace(counts=lambda: {f"mlp.{i}": {"esu": 1, "cu": 1, "euu": 1, "ru": 1, "total": 4}
                                               for i in (0, 1, 10)})
    path = plot_units_per_layer(one_kind, tmp_path / "mlp.png")
    assert png_size(path) == (10 * DPI, round(3.2 * DPI))
    assert {rgb(c) for c in CLASS_COLORS.values()} <= colours(path)  # a quarter of each class: every colour drawn


def test_drift_plots_iou_per_class_and_the_last_transitions(tmp_path):
    classes = ["esu", "cu", "euu", "ru"]
    records = [{"step": 0, "iou": dict.fromkeys(classes, 1.0), "transitions": [[5, 0, 0, 0], [0, 5, 0, 0],
                                                                                 [0, 0, 5, 0], [0, 0, 0, 5]]},
               {"step": 4, "iou": {"esu": None, "cu": 0.5, "euu": 0.8, "ru": 0.9},  # None: an empty class
                "transitions": [[0, 3, 2, 0], [1, 4, 0, 0], [0, 0, 5, 0], [0, 1, 0, 4]]}]
    path = plot_drift(records, classes, tmp_path / "drift.png", title="drift")
    assert png_size(path) == (11 * DPI, round(4.2 * DPI))
    assert {rgb(CLASS_COLORS[c]) for c in ("cu", "euu", "ru")} <= colours(path)  # the classes' IoU lines
