"""Uniform allocation: every projection at the target sparsity."""

from __future__ import annotations

from .base import Allocation


class Uniform(Allocation):
    name = "uniform"

    def sparsities(self, outlier_ratios: dict[str, float], target: float) -> dict[str, float]:
        return dict.fromkeys(outlier_ratios, target)
