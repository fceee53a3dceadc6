"""Allocation: *how much* each projection is pruned, with the parameter-weighted total exactly on target.

An allocation measures whatever it needs on the dense model through an :class:`AllocationContext` (outlier
ratios from a layer-streamed calibration pass today; loss gradients for a Fisher allocation), and returns a
:class:`Budget`: a sparsity per projection. :func:`exact_counts` then shifts and rounds those into integer prune
counts whose sum is exactly ``round(target * total)``; that shift is the one renormalisation every allocation gets.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.block import BlockContext, InputStream
from ..core.adapters import ModelAdapter, Projection
from ..core.components import Component
from ..core.residency import BlockResidency
from ..methods.wanda import wanda_scores


@dataclass
class Budget:
    """Per projection key: ``sparsity`` before exact renormalisation, and the ``ratios`` (outlier ratio or other
    sensitivity) it came from, reported per projection and used to plan whole-unit removal (empty if none).
    ``unit_removals`` (unit group key -> units to remove), where given, replaces the engine's unit planner."""

    sparsity: dict[str, float]
    ratios: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # what the allocation measured or searched (into the report)
    unit_removals: dict[str, int] | None = None


class AllocationContext:
    """The dense model and its calibration data, as an allocation may read them before anything is pruned."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        batches: Sequence[torch.Tensor],
        progress: bool = True,
        config: Any = None,
        residency: BlockResidency | None = None,
    ) -> None:
        self.model, self.adapter, self.batches, self.progress = model, adapter, batches, progress
        self.config = config  # the PruningConfig (method, pattern, bounds), for searches; not imported: a cycle
        self.residency = residency or BlockResidency(adapter)
        self.projections: list[Projection] = adapter.all_projections()

    def dense_blocks(self, desc: str) -> Iterator[BlockContext]:
        """Every block in order, on the dense model's activations (layer-streamed: one block's inputs held, and
        each block loaded on the execution device only while it is read)."""
        stream = InputStream(self.model, self.adapter, self.batches, sequential=False, residency=self.residency)
        for layer in tqdm(range(self.adapter.num_layers), desc=desc, disable=not self.progress):
            self.residency.load(layer)
            try:
                yield BlockContext(self.adapter, layer, stream)
                stream.finish(layer)
            finally:
                self.residency.unload(layer)


class Allocation(Component):
    """Base of every allocation: ``allocate(context, target) -> Budget``.

    ``needs_whole_model``: it runs the whole model at once (not only ``context.dense_blocks``), so it cannot
    work on a model streamed from disk block by block.
    """

    needs_whole_model = False

    @abstractmethod
    def allocate(self, context: AllocationContext, target: float) -> Budget:
        """Per-projection sparsities averaging about ``target`` (renormalised exactly afterwards)."""


class OutlierWeighted(Allocation):
    """Allocations from outlier ratios (OWL, Mosaic): the share of Wanda scores ``|W| * ||X||`` above
    ``threshold`` times their group's mean, measured on the dense model.

    Args:
        threshold: OWL's ``M`` (Mosaic's README: 5).
        lam: spread: normalised ratios span ``[0, 2 * lam]`` (OWL and Mosaic: 0.08).
    """

    def __init__(self, threshold: float = 5.0, lam: float = 0.08) -> None:
        if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"outlier threshold={threshold!r}; must be a finite number > 0 (OWL uses 3..7, often 5)")
        if not (isinstance(lam, int | float) and math.isfinite(lam) and 0 <= lam < 0.5):
            raise ValueError(f"lam={lam!r}; allowed values: 0 <= lam < 0.5 (OWL and Mosaic use 0.08)")
        self.threshold, self.lam = float(threshold), float(lam)

    def outlier_profile(
        self, context: AllocationContext, groups: Callable[[Projection], list[str]]
    ) -> dict[str, float]:
        """Outlier ratio of every group; a projection may belong to several groups, all within its layer."""
        ratios: dict[str, float] = {}
        for block in context.dense_blocks("outlier profile"):
            scores = {}
            for proj in block.projections:
                with block.gathered(proj):
                    scores[proj.key] = wanda_scores(proj.weight_view(), block.stats(proj).column_norms)
            members = {p.key: groups(p) for p in block.projections}
            ratios.update(outlier_ratios(scores, members, self.threshold))
        return ratios


def minmax_spread(values: torch.Tensor, lam: float) -> torch.Tensor:
    """``2 * lam * (v - min) / (max - min)`` (zeros when all values are equal): OWL's normalisation."""
    spread = values.max() - values.min()
    if spread <= 0:
        return torch.zeros_like(values)
    return (values - values.min()) / spread * (2 * lam)


def outlier_ratios(scores: dict[str, torch.Tensor], groups: dict[str, list[str]], threshold: float) -> dict[str, float]:
    """Per group: fraction of scores above ``threshold *`` the group's mean score (``groups``: key -> its groups)."""
    sums: dict[str, torch.Tensor] = {}  # tensors until the end: one host sync for the whole call
    counts: dict[str, int] = {}
    for key, s in scores.items():
        for g in groups[key]:
            sums[g] = sums[g] + s.double().sum() if g in sums else s.double().sum()
            counts[g] = counts.get(g, 0) + s.numel()
    above: dict[str, torch.Tensor] = {}
    for key, s in scores.items():
        for g in groups[key]:
            n = (s > (threshold * sums[g] / counts[g]).to(s.dtype)).sum()
            above[g] = above[g] + n if g in above else n
    if not sums:
        return {}
    values = torch.stack([above[g].to(torch.float64) for g in sums]).tolist()
    return {g: v / counts[g] for g, v in zip(sums, values, strict=True)}


def count_quanta(pattern, projections: Sequence[Projection]) -> dict[str, int]:
    """What every projection's prune count must be a multiple of under ``pattern`` (1 but for mixed N:M)."""
    return {p.key: pattern.quantum(p.out_features, p.in_features) for p in projections}


def exact_counts(
    sizes: dict[str, int],
    sparsity: dict[str, float],
    target: float,
    min_sparsity: float,
    max_sparsity: float,
    goal: int | None = None,
    quanta: dict[str, int] | None = None,
) -> dict[str, int]:
    """Integer prune counts: ``clip(s_p + c)`` with the shift ``c`` solved so the total is exactly on target.

    Each count stays within ``[ceil(min * n), floor(max * n)]`` of its projection's size ``n``, and is a multiple
    of its ``quanta`` entry where given (mixed N:M: whole steps of ``n / M``).
    """
    quanta = quanta or dict.fromkeys(sizes, 1)
    total = sum(sizes.values())
    goal = round(target * total) if goal is None else goal
    low = {k: math.ceil((min_sparsity * n - 1e-9) / quanta[k]) * quanta[k] for k, n in sizes.items()}
    high = {k: math.floor((max_sparsity * n + 1e-9) / quanta[k]) * quanta[k] for k, n in sizes.items()}
    if not sum(low.values()) <= goal <= sum(high.values()):
        raise ValueError(
            f"min_sparsity={min_sparsity} and max_sparsity={max_sparsity} cannot average to sparsity="
            f"{goal / max(total, 1):.4f} over these projections"
        )

    def pruned(shift: float) -> float:
        return sum(n * min(max(sparsity[k] + shift, min_sparsity), max_sparsity) for k, n in sizes.items())

    lo, hi = -1.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pruned(mid) < goal else (lo, mid)
    shift = (lo + hi) / 2
    raw = {k: n * min(max(sparsity[k] + shift, min_sparsity), max_sparsity) for k, n in sizes.items()}
    counts = {k: min(max(int(r) // quanta[k] * quanta[k], low[k]), high[k]) for k, r in raw.items()}
    remainder = goal - sum(counts.values())
    step = 1 if remainder > 0 else -1
    # Largest fractional parts first when adding, smallest first when removing; repeat while room remains.
    while remainder:
        order = sorted(raw, key=lambda k: (raw[k] - counts[k]) / quanta[k], reverse=step > 0)
        movable = [k for k in order if low[k] <= counts[k] + step * quanta[k] <= high[k]
                   and quanta[k] <= abs(remainder)]  # fmt: skip
        if not movable:
            raise ValueError(
                f"sparsity={goal / max(total, 1):.6f} cannot be reached exactly in whole steps of 1/M of each "
                "projection (mixed N:M); choose a sparsity that is a multiple of 1/M"
            )
        for k in movable:
            if quanta[k] <= abs(remainder):
                counts[k] += step * quanta[k]
                remainder -= step * quanta[k]
    return counts
