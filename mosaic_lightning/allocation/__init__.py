"""Sparsity allocations by name. A new allocation is a new file here plus one line in :data:`ALLOCATIONS`."""

from __future__ import annotations

from .base import Allocation, OutlierWeighted, exact_counts, outlier_ratios
from .owl import OWL
from .pod import MosaicPOD
from .pod_typed import TypeNormalisedPOD
from .uniform import Uniform

ALLOCATIONS: dict[str, type[Allocation]] = {a.name: a for a in (Uniform, OWL, MosaicPOD, TypeNormalisedPOD)}


def build_allocation(name: str, threshold: float = 5.0, lam: float = 0.08) -> Allocation:
    if name not in ALLOCATIONS:
        raise ValueError(f"allocation={name!r}; allowed values: {sorted(ALLOCATIONS)}")
    cls = ALLOCATIONS[name]
    return cls(threshold=threshold, lam=lam) if issubclass(cls, OutlierWeighted) else cls()


__all__ = [
    "ALLOCATIONS",
    "OWL",
    "Allocation",
    "MosaicPOD",
    "TypeNormalisedPOD",
    "Uniform",
    "build_allocation",
    "exact_counts",
    "outlier_ratios",
]
