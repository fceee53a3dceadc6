"""Sparsity allocations (*how much*). A new allocation is one new file here: an :class:`Allocation` subclass with a
``name`` shorthand; a user's own subclass elsewhere works through ``class_path``."""

from __future__ import annotations

from .base import (
    Allocation,
    AllocationContext,
    Budget,
    OutlierWeighted,
    count_quanta,
    exact_counts,
    minmax_spread,
    outlier_ratios,
)
from .energy import EnergySoftmax
from .mosaic import Mosaic
from .msp import MSP
from .owl import OWL
from .uniform import Uniform


def resolve_allocation(value, field: str = "allocation") -> Allocation:
    """An allocation from a shorthand (``"owl"``), ``{"class_path", "init_args"}`` or an instance."""
    from ..core.components import resolve

    return resolve(value, Allocation, __name__, field)


__all__ = [
    "MSP",
    "OWL",
    "Allocation",
    "AllocationContext",
    "Budget",
    "EnergySoftmax",
    "Mosaic",
    "OutlierWeighted",
    "Uniform",
    "count_quanta",
    "exact_counts",
    "minmax_spread",
    "outlier_ratios",
    "resolve_allocation",
]
