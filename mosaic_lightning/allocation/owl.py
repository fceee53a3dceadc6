"""OWL (Yin et al., 2024): outlier-weighted *layerwise* sparsity; all projections of a layer share one value."""

from __future__ import annotations

from ..adapters import Projection
from .base import OutlierWeighted


class OWL(OutlierWeighted):
    name = "owl"

    def group(self, proj: Projection) -> str:
        return f"layer{proj.layer}"
