"""Mosaic (Eccles, Wong & Varghese, 2025): per-projection sparsity from the projection outlier distribution,
as the published code computes it (github blessonvar/Mosaic, ``lib/prune_all.py``, ``prune_sparsegpt_mosaic``).

On the dense model, with Wanda scores ``|W| * ||X||`` and ``M = threshold``:

- ``D_l``: share of layer ``l``'s scores (all its projections together) above ``M`` times their mean;
- ``D_{t,l}``: the same for projection type ``t`` (q, k, v, o, gate, up, down) of layer ``l`` alone;
- ``A_l = 2 lam (D_l - min_l D) / (max_l D - min_l D)`` (OWL's layer term);
- ``B_{t,l} = 2 lam (D_{t,l} - min_l D_t) / (max_l D_t - min_l D_t)`` (min-max over the layers *within* type t);
- ``sparsity_{t,l} = s - A_l + mean_l(B_{t,l})``; values ``<= 0`` become 0.01.

So every projection gets OWL's layer profile (not centred: the reference subtracts ``A_l`` itself) plus an
offset per projection type. That is ``offset="published"``, the default. The reference code alone does not settle
how the per-type values were meant to enter (it computes ``B_{t,l}`` per projection, then uses only its mean over
layers, un-centred), so ``offset`` also takes the other readings, to be settled by measurement
(``bench/quality.py --suite mosaic-variants``; see bench/RESULTS.md, section 'The published Mosaic against OWL and
uniform'):

- ``"published"``: ``sparsity_{t,l} = s - A_l + mean_l(B_{t,l})`` (above);
- ``"off"``: ``sparsity_{t,l} = s - (A_l - mean_l A_l)``, OWL's layerwise formula (no type term; the same values
  as ``OWL`` wherever none falls to the floor below);
- ``"flipped"``: ``sparsity_{t,l} = s - A_l - mean_l(B_{t,l})``, the type offset with its sign reversed (types
  whose layers have more outliers, after the min-max, are pruned *less*);
- ``"centred"``: ``sparsity_{t,l} = s - (B_{t,l} - mean_l B_{t,l})``, each projection its own term, centred within
  its type, so every type averages ``s`` over the layers (the shape of OWL's line applied per type; no layer term).

In every mode values ``<= 0`` become 0.01 (the reference's floor). The threshold ``M`` is ``threshold`` (the
reference's command line defaults to 3, its README example and the recipes here use 5).

The reference pairs this with SparseGPT (damping 0.01, block 128), sequential,
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
OFFSETS = ("published", "off", "flipped", "centred")


class Mosaic(OutlierWeighted):
    """Args:
        threshold: ``M`` (the reference: 3 on its command line, 5 in its README example; recipes here: 5).
        lam: spread of the min-max terms, ``[0, 2 * lam]`` (0.08).
        offset: how the per-type outlier term enters: ``"published"`` (default), ``"off"``, ``"flipped"`` or
            ``"centred"``; formulas in the module docstring.
    """

    name = "mosaic"

    def __init__(self, threshold: float = 5.0, lam: float = 0.08, offset: str = "published") -> None:
        super().__init__(threshold, lam)
        if offset not in OFFSETS:
            raise ValueError(f"offset={offset!r}; allowed values: {list(OFFSETS)}")
        self.offset = offset

    def allocate(self, context: AllocationContext, target: float) -> Budget:
        ratio = self.outlier_profile(context, lambda p: [f"layer{p.layer}", p.key])
        layers = sorted({p.layer for p in context.projections})
        a = minmax_spread(torch.tensor([ratio[f"layer{i}"] for i in layers], dtype=torch.float64), self.lam)
        layer_term = dict(zip(layers, a.tolist(), strict=True))
        layer_mean = float(a.mean())
        type_offset, own_term = {}, {}
        for kind in dict.fromkeys(p.name for p in context.projections):
            of_kind = [p for p in context.projections if p.name == kind]
            b = minmax_spread(torch.tensor([ratio[p.key] for p in of_kind], dtype=torch.float64), self.lam)
            type_offset[kind] = float(b.mean())
            own_term.update({p.key: float(v - b.mean()) for p, v in zip(of_kind, b, strict=True)})
        sparsity = {}
        for p in context.projections:
            if self.offset == "published":
                value = target - layer_term[p.layer] + type_offset[p.name]
            elif self.offset == "flipped":
                value = target - layer_term[p.layer] - type_offset[p.name]
            elif self.offset == "off":
                value = target - (layer_term[p.layer] - layer_mean)
            else:  # centred
                value = target - own_term[p.key]
            sparsity[p.key] = value if value > 0 else FLOOR
        return Budget(sparsity, {p.key: ratio[p.key] for p in context.projections})
