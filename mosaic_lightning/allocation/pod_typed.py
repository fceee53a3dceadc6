"""Mosaic POD normalised per projection type: each projection's outlier ratio relative to its type's mean.

Plain POD compares all 7 x L projections on one scale. On SmolLM2 the outlier ratio is driven by the projection
*type* (q/k far above up/down), so the OWL rule moves budget between types wholesale (bench/RESULTS.md: worse
than OWL at 70%). Dividing each ratio by its type's mean over layers keeps every projection's own sparsity
(more outliers than its type usually has -> pruned less) while every type keeps, on average, the target.
"""

from __future__ import annotations

from .base import OutlierWeighted


class TypeNormalisedPOD(OutlierWeighted):
    name = "mosaic-typed"

    def sparsities(self, outlier_ratios: dict[str, float], target: float) -> dict[str, float]:
        by_type: dict[str, list[float]] = {}
        for key, ratio in outlier_ratios.items():
            by_type.setdefault(_type(key), []).append(ratio)
        means = {t: sum(values) / len(values) for t, values in by_type.items()}
        relative = {k: r / means[_type(k)] if means[_type(k)] > 0 else 1.0 for k, r in outlier_ratios.items()}
        return super().sparsities(relative, target)


def _type(key: str) -> str:
    """``"12.q"`` -> ``"q"``: group keys are projection keys (layer.name)."""
    return key.split(".", 1)[1]
