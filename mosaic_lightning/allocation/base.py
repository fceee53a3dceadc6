"""Allocation: *how much* each projection is pruned, with the parameter-weighted total exactly on target.

An allocation groups projections (per layer for OWL, per projection for Mosaic POD), measures each group's
outlier ratio on the dense model, turns ratios into per-group sparsities, and :func:`exact_counts` then shifts
and rounds those into integer prune counts whose sum is exactly ``round(target * total)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..adapters import Projection


class Allocation(ABC):
    name: str

    @property
    def needs_profile(self) -> bool:
        """Whether outlier ratios of the dense model must be measured first (a calibration sweep)."""
        return False

    def group(self, proj: Projection) -> str:
        return proj.key

    @abstractmethod
    def sparsities(self, outlier_ratios: dict[str, float], target: float) -> dict[str, float]:
        """Per-group sparsity before exact renormalisation."""


class OutlierWeighted(Allocation):
    """OWL's rule, shared by OWL (groups = layers) and Mosaic POD (groups = projections).

    Outlier ratio ``D_g`` = share of Wanda scores above ``threshold * mean`` in the group. Normalised to
    ``[0, 2*lam]``, centred, and subtracted from the target: groups with more outliers are pruned less.
    """

    def __init__(self, threshold: float = 5.0, lam: float = 0.08) -> None:
        if threshold <= 0:
            raise ValueError(f"outlier threshold={threshold}; must be > 0 (OWL uses 3..7, often 5)")
        if not 0 <= lam < 0.5:
            raise ValueError(f"lam={lam}; allowed values: 0 <= lam < 0.5 (OWL uses ~0.08)")
        self.threshold, self.lam = threshold, lam

    @property
    def needs_profile(self) -> bool:
        return True

    def sparsities(self, outlier_ratios: dict[str, float], target: float) -> dict[str, float]:
        ratios = torch.tensor(list(outlier_ratios.values()), dtype=torch.float64)
        spread = ratios.max() - ratios.min()
        if spread <= 0:
            return dict.fromkeys(outlier_ratios, target)
        norm = (ratios - ratios.min()) / spread * (2 * self.lam)
        sparsity = target - (norm - norm.mean())
        return dict(zip(outlier_ratios, sparsity.tolist(), strict=True))


def outlier_ratios(
    scores: dict[str, torch.Tensor], groups: dict[str, str], threshold: float
) -> dict[str, float]:
    """Per group: fraction of scores above ``threshold *`` the group's mean score."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for key, s in scores.items():
        g = groups[key]
        sums[g] = sums.get(g, 0.0) + float(s.double().sum())
        counts[g] = counts.get(g, 0) + s.numel()
    above: dict[str, int] = dict.fromkeys(sums, 0)
    for key, s in scores.items():
        g = groups[key]
        above[g] += int((s > threshold * sums[g] / counts[g]).sum())
    return {g: above[g] / counts[g] for g in sums}


def exact_counts(
    sizes: dict[str, int],
    sparsity: dict[str, float],
    target: float,
    min_sparsity: float,
    max_sparsity: float,
    goal: int | None = None,
) -> dict[str, int]:
    """Integer prune counts: ``clip(s_p + c)`` with the shift ``c`` solved so the total is exactly on target.

    Each count stays within ``[ceil(min * n), floor(max * n)]`` of its projection's size ``n``.
    """
    total = sum(sizes.values())
    goal = round(target * total) if goal is None else goal
    low = {k: math.ceil(min_sparsity * n - 1e-9) for k, n in sizes.items()}
    high = {k: math.floor(max_sparsity * n + 1e-9) for k, n in sizes.items()}
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
    counts = {k: min(max(int(r), low[k]), high[k]) for k, r in raw.items()}
    remainder = goal - sum(counts.values())
    step = 1 if remainder > 0 else -1
    # Largest fractional parts first when adding, smallest first when removing; repeat while room remains.
    while remainder:
        order = sorted(raw, key=lambda k: raw[k] - counts[k], reverse=step > 0)
        movable = [k for k in order if low[k] <= counts[k] + step <= high[k]]
        for k in movable[: abs(remainder)]:
            counts[k] += step
            remainder -= step
    return counts
