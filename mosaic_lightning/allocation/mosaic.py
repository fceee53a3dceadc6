"""Mosaic (Eccles, Wong & Varghese, 2025): per-projection sparsity from the projection outlier distribution,
as the published code computes it (github blessonvar/Mosaic, ``lib/prune_all.py``, ``prune_sparsegpt_mosaic``).

On the dense model, with Wanda scores ``|W| * ||X||`` and ``M = threshold``:

- ``D_l``: share of layer ``l``'s scores (all its projections together) above ``M`` times their mean;
- ``D_{t,l}``: the same for projection type ``t`` (q, k, v, o, gate, up, down) of layer ``l`` alone;
- ``A_l = 2 lam (D_l - min_l D) / (max_l D - min_l D)`` (OWL's layer term);
- ``B_{t,l} = 2 lam (D_{t,l} - min_l D_t) / (max_l D_t - min_l D_t)`` (min-max over the layers *within* type t);
- ``sparsity_{t,l} = s - A_l + mean_l(B_{t,l})``; values ``<= 0`` become 0.01.

So every projection gets OWL's layer profile (not centred: the reference subtracts ``A_l`` itself) plus an
offset per projection type. The reference pairs this with SparseGPT (damping 0.01, block 128), sequential,
128 x 2048 calibration tokens; ``recipes/mosaic-50.yaml`` and ``mosaic-70.yaml`` do the same (SparseGPT,
sequential), with 128 x 512 tokens.

The one deliberate deviation: the reference never renormalises, so its parameter-weighted total drifts from
``s``; here the engine's exact renormalisation (one shift added to every projection, then integer counts, see
:func:`~mosaic_lightning.allocation.exact_counts`) makes the achieved sparsity equal ``s`` to the weight.
"""

from __future__ import annotations

import torch

from .base import AllocationContext, Budget, OutlierWeighted, minmax_spread

FLOOR = 0.01  # the reference's value for a sparsity that came out <= 0


class Mosaic(OutlierWeighted):
    name = "mosaic"

    def allocate(self, context: AllocationContext, target: float) -> Budget:
        ratio = self.outlier_profile(context, lambda p: [f"layer{p.layer}", p.key])
        layers = sorted({p.layer for p in context.projections})
        a = minmax_spread(torch.tensor([ratio[f"layer{i}"] for i in layers], dtype=torch.float64), self.lam)
        layer_term = dict(zip(layers, a.tolist(), strict=True))
        type_offset = {}
        for kind in dict.fromkeys(p.name for p in context.projections):
            of_kind = [p for p in context.projections if p.name == kind]
            b = minmax_spread(torch.tensor([ratio[p.key] for p in of_kind], dtype=torch.float64), self.lam)
            type_offset[kind] = float(b.mean())
        sparsity = {}
        for p in context.projections:
            value = target - layer_term[p.layer] + type_offset[p.name]
            sparsity[p.key] = value if value > 0 else FLOOR
        return Budget(sparsity, {p.key: ratio[p.key] for p in context.projections})
