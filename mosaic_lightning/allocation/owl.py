"""OWL (Yin et al., 2024): outlier-weighted *layerwise* sparsity; all projections of a layer share one value.

``D_l`` = share of the layer's Wanda scores (all its projections together) above ``threshold`` times their mean;
``sparsity_l = s - (A_l - mean A)`` with ``A = 2 lam minmax(D)``: layers with more outliers are pruned less.
"""

from __future__ import annotations

import torch

from .base import AllocationContext, Budget, OutlierWeighted, minmax_spread


class OWL(OutlierWeighted):
    name = "owl"

    def allocate(self, context: AllocationContext, target: float) -> Budget:
        layer_ratio = self.outlier_profile(context, lambda p: [f"layer{p.layer}"])
        layers = sorted({p.layer for p in context.projections})
        a = minmax_spread(torch.tensor([layer_ratio[f"layer{i}"] for i in layers], dtype=torch.float64), self.lam)
        sparsity = dict(zip(layers, (target - (a - a.mean())).tolist(), strict=True))
        return Budget(
            {p.key: sparsity[p.layer] for p in context.projections},
            {p.key: layer_ratio[f"layer{p.layer}"] for p in context.projections},
        )
