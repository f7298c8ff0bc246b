"""The parameter slices a unit owns and a group of units (safety_units.units.groups builds them per architecture).

A unit owns `width` consecutive entries of each slice along the slice's dimension (1 for channels, head_dim for a
head's q rows and o columns); a `shared` slice's block of `width` entries belongs to `shared` consecutive units. A
fused projection holds `parts` copies of the unit axis end to end (Phi-3's gate_up_proj: gate rows, then up rows),
so MLP unit j owns row j of every part -- entries that are not contiguous. An `index` places a slice's entries
anywhere along the dimension (a fused q/k/v's k rows: safety_units.units.heads). An expert slice (`experts` > 1)
repeats all of this per expert along its dimension 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ParamSlice:
    name: str  # name in model.named_parameters()
    param: nn.Parameter
    dim: int  # the dimension indexed by unit
    width: int = 1  # entries per unit (block) along dim
    shared: int = 1  # units sharing one block (grouped-query K/V)
    parts: int = 1  # copies of the unit axis laid end to end along dim (a fused gate_up_proj: 2)
    experts: int = 1  # > 1: dimension 0 is the expert axis; units e * U ... (e + 1) * U - 1 are expert e's
    index: torch.Tensor | None = None  # where the entries sit along dim, in unit order (a fused q/k/v's k part)
    ablate: bool = True  # False: ablation leaves it (q/k rows under a norm that spans every head)

    def entries(self, units: torch.Tensor, reduce: str = "all") -> torch.Tensor:
        """A per-unit bool vector as a per-entry vector along `dim` ([experts, entries] for an expert slice); a
        shared block is True when all (or any) of its units are; a fused slice repeats it once per part."""
        units = units.view(self.experts, -1)
        if self.shared > 1:
            blocks = units.view(self.experts, -1, self.shared)
            units = blocks.all(dim=-1) if reduce == "all" else blocks.any(dim=-1)
        units = units.repeat_interleave(self.width, dim=-1) if self.width > 1 else units
        units = units.repeat(1, self.parts) if self.parts > 1 else units
        return units if self.experts > 1 else units[0]

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Per-entry values along `dim` (flat, or [experts, entries]) summed per unit (over every part of a fused
        slice); a shared block's sum split evenly among its units."""
        values = values.reshape(self.experts, -1)
        if self.parts > 1:
            values = values.view(self.experts, self.parts, -1).sum(dim=1)
        if self.width > 1:
            values = values.view(self.experts, -1, self.width).sum(dim=-1)
        if self.shared > 1:
            values = values.repeat_interleave(self.shared, dim=-1) / self.shared
        return values.flatten()

    def place(self, entries: torch.Tensor, fill: bool) -> torch.Tensor:
        """Per-entry values as entries() returns them, over the parameter's whole `dim` (`fill` elsewhere)."""
        if self.index is None:
            return entries
        full = torch.full((self.param.shape[self.dim],), fill, dtype=entries.dtype)
        full[self.index] = entries
        return full

    def region(self, t: torch.Tensor) -> torch.Tensor:
        """The slice's entries of a tensor shaped like the parameter, in unit order."""
        return t if self.index is None else t.index_select(self.dim, self.index.to(t.device))

    @property
    def unit_dims(self) -> tuple[int, ...]:
        return (0, self.dim) if self.experts > 1 else (self.dim,)

    def channels_first(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """`t` (default: the parameter) as [entries along the unit dims, everything else]: an out weight's
        columns as rows, an expert slice's experts laid end to end."""
        t = self.region(self.param if t is None else t)
        t = t.movedim(self.unit_dims, tuple(range(len(self.unit_dims))))
        return t.reshape(-1, *t.shape[len(self.unit_dims):]).flatten(1) if t.ndim > len(self.unit_dims) else \
            t.reshape(-1)

    def unit_values(self, t: torch.Tensor) -> torch.Tensor:
        """Per-unit sums of a tensor shaped like the parameter (a gradient product, a squared change)."""
        rows = self.channels_first(t)
        return self.per_unit(rows.sum(dim=1) if rows.ndim == 2 else rows)

    def broadcast(self, entries: torch.Tensor) -> torch.Tensor:
        """Per-entry values (as entries() returns them) shaped to broadcast against the parameter."""
        shape = [1] * self.param.ndim
        for d, size in zip(self.unit_dims, entries.shape):
            shape[d] = size
        return entries.reshape(shape)


@dataclass
class UnitGroup:
    kind: str
    layer: int
    n: int
    slices: list[ParamSlice] = field(default_factory=list)
    out_module: nn.Module | None = None  # its input channels are the units (experts: the experts module)
    out_name: str = ""
    out_weight: ParamSlice | None = None  # the out module's weight slice (columns = units)
    width: int = 1  # input channels of out_module per unit (head_dim for a head)
    experts: int = 1  # an expert group's experts: units e * (n / experts) ... are expert e's

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.layer}"

    def per_unit(self, channels: torch.Tensor) -> torch.Tensor:
        """Per-channel values at out_module's input ([..., n * width]) summed per unit ([..., n])."""
        if self.width == 1:
            return channels
        return channels.reshape(*channels.shape[:-1], self.n, self.width).sum(dim=-1)

    def per_channel(self, units: torch.Tensor) -> torch.Tensor:
        """Per-unit values ([n]) repeated over each unit's channels ([n * width])."""
        return units.repeat_interleave(self.width) if self.width > 1 else units


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): its weight is (in_features, out_features), the transpose of a Linear's."""
    return type(module).__name__ == "Conv1D"
