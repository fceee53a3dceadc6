"""StructPrune's energy softmax: each layer's structured ratio ``r_g ∝ softmax(-E_g / T)``, scaled so the whole
units removed add up to the structural target, then made exact by single weights.

The paper's abstract gives the softmax form; the energy and every constant are this file's choices:

- **Energy.** For a unit group ``g`` (one layer's MLP channels, or its heads), each unit's score is its output
  energy through the consumer under the diagonal of the consumer's input Gram,
  ``c_u = sum_{j in u} ||W_:,j||^2 ||X_j||^2`` (down for channels, o for heads; ``||X_j||`` over all calibration
  tokens, summed over ranks): the cost StructPrune's closed-form mask charges for removing ``u`` (with the
  diagonal instead of the unit's diagonal block, so the profile needs no Hessian pass). ``E_g`` is the mean unit
  score relative to the energy of the residual stream entering the block, ``sum_t ||h_t||^2``: a unit writing
  1% of the stream matters less than one writing 10%, whatever the depth's overall scale. Energies are then
  divided by their mean over the groups of the same kind, so ``T`` is unit-free and channels and heads compare.
- **Softmax and exact total.** ``r_g = min(c * exp(-E_g / T), cap_g)``, with ``c`` solved by bisection so that
  ``sum_g r_g * count_g * params_per_unit_g`` equals the structural target ``round(structured_fraction *
  sparsity * targeted weights)`` (for a size target, ``params_per_unit_g`` counts the bias entries a unit takes
  with it); ``cap_g`` = ``max_ratio``, and at least one unit per (key/value) group stays.
  ``T -> inf`` is uniform, ``T -> 0`` strips the lowest-energy layers first.
- **Integers.** Heads are coarse (a removal is one head per key/value group), so they are rounded first to the
  nearest valid count (stepping down the most rounded-up ones while they overshoot); MLP channels are re-solved
  on what is left, floored, and topped up one channel at a time (largest fractional part first) while the total
  stays within the target. The whole units then fall short of the target by less than one channel's weights,
  and the engine prunes exactly that many single weights, so the achieved total equals the target exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..core.adapters import Projection
from ..core.structure import HEADS, MLP, UnitGroup, unit_groups
from ..core.validation import check_positive
from .base import Allocation, AllocationContext, Budget


class EnergySoftmax(Allocation):
    """Per-layer structured ratios from the energy softmax; see the module docstring.

    Args:
        temperature: ``T`` of ``softmax(-E / T)`` on mean-normalised energies.
        max_ratio: the largest share of any one group's units removed, in (0, 1).
    """

    name = "energy"

    def __init__(self, temperature: float = 1.0, max_ratio: float = 0.9) -> None:
        check_positive("energy temperature", temperature)
        if isinstance(max_ratio, bool) or not isinstance(max_ratio, int | float) or not 0 < max_ratio < 1:
            raise ValueError(f"energy max_ratio={max_ratio!r}; allowed values: 0 < max_ratio < 1")
        self.temperature, self.max_ratio = float(temperature), float(max_ratio)

    def allocate(self, context: AllocationContext, target: float) -> Budget:
        config = _check_config(context.config)
        groups = unit_groups(context.adapter, config.structured_units)
        by_layer = {g.layer: {p.name: p for p in context.adapter.projections(g.layer)} for g in groups}
        per_unit = {g.key: g.params_per_unit(by_layer[g.layer], config.counts_biases) for g in groups}
        goal = round(target * sum(p.numel for p in context.projections))
        structural = round(config.structured_fraction * goal)
        scaled_ratios(groups, per_unit, dict.fromkeys(per_unit, 1.0), structural, self.max_ratio)  # feasible? first
        energies = group_energies(context, groups)
        weights = softmax_weights(energies, self.temperature)
        ratios = scaled_ratios(groups, per_unit, weights, structural, self.max_ratio)
        removals = integer_removals(groups, per_unit, weights, ratios, structural, self.max_ratio)
        details = {"energy": energies, "ratio": ratios, "removals": removals, "structural_target": structural,
                   "temperature": self.temperature}  # fmt: skip
        return Budget(dict.fromkeys((p.key for p in context.projections), target), {}, details, removals)


def _check_config(config):
    if config is None:
        raise ValueError(
            "allocation 'energy' plans whole units: it needs the PruningConfig (run it through prune_model)"
        )
    if not config.structured:
        raise ValueError(
            f"allocation 'energy' sets each layer's structured ratio, but structured_fraction="
            f"{config.structured_fraction}; set structured_fraction > 0 (1.0 for structured only)"
        )
    if config.uniform_structure:
        raise ValueError(
            "allocation 'energy' gives every layer its own structured ratio, which uniform_structure=True forbids; "
            "set uniform_structure=false (load the export with load_pruned) or use allocation 'uniform'"
        )
    return config


def group_energies(context: AllocationContext, groups: list[UnitGroup]) -> dict[str, float]:
    """``E_g``: mean unit score over the residual stream's energy, normalised to mean 1 per unit kind."""
    raw: dict[str, float] = {}
    for block in context.dense_blocks("energy profile"):
        mine = [g for g in groups if g.layer == block.layer]
        if not mine:
            continue
        stream = _summed(sum(h.double().square().sum() for h in block.inputs.hidden))
        projs = {p.name: p for p in block.projections}
        for group in mine:
            raw[group.key] = float(energy_scores(group, projs[group.cols[0]], block).sum()) / group.count / stream
    means = {kind: _mean([v for k, v in raw.items() if k.endswith(f".{kind}")]) for kind in (MLP, HEADS)}
    return {k: v / means[k.rpartition(".")[2]] for k, v in raw.items()}


def energy_scores(group: UnitGroup, consumer: Projection, block) -> torch.Tensor:
    """``c_u = sum_{j in u} ||W_:,j||^2 ||X_j||^2`` of every unit, from the consumer (down/o)."""
    norms = block.stats(consumer).column_norms.double()
    with block.gathered(consumer):
        columns = consumer.weight_view().double().square().sum(dim=0) * norms.square()
    return columns.view(group.count, group.size).sum(dim=1)


def softmax_weights(energies: dict[str, float], temperature: float) -> dict[str, float]:
    """``exp(-E_g / T)`` up to a common factor (shifted by the lowest energy, so nothing underflows to 0)."""
    lowest = min(energies.values())
    return {k: math.exp(-(e - lowest) / temperature) for k, e in energies.items()}


def scaled_ratios(
    groups: list[UnitGroup], per_unit: dict[str, int], weights: dict[str, float], structural: int, max_ratio: float
) -> dict[str, float]:
    """``r_g = min(c * weights_g, cap_g)`` with ``c`` such that the removed weights sum to ``structural``."""
    caps = {g.key: _cap(g, max_ratio) for g in groups}
    sizes = {g.key: g.count * per_unit[g.key] for g in groups}

    def removed(scale: float) -> float:
        return sum(sizes[k] * min(scale * weights[k], caps[k]) for k in sizes)

    if removed(1e300) < structural:
        raise ValueError(
            f"whole units cannot remove {structural:,} weights (at most {int(removed(1e300)):,} with max_ratio="
            f"{max_ratio}); lower sparsity or structured_fraction, or raise max_ratio"
        )
    lo, hi = 0.0, 1.0
    while removed(hi) < structural:
        hi *= 2
    for _ in range(200):
        lo, hi = ((lo + hi) / 2, hi) if removed((lo + hi) / 2) < structural else (lo, (lo + hi) / 2)
    return {k: min(hi * weights[k], caps[k]) for k in sizes}


def _cap(group: UnitGroup, max_ratio: float) -> float:
    """Largest removable share: ``max_ratio``, on the valid counts (one unit per key/value group stays)."""
    return max(n for n in group.valid_removals() if n <= max_ratio * group.count) / group.count


def integer_removals(
    groups: list[UnitGroup],
    per_unit: dict[str, int],
    weights: dict[str, float],
    ratios: dict[str, float],
    structural: int,
    max_ratio: float,
) -> dict[str, int]:
    """Whole units per group: heads rounded first (``ratios``), MLP channels re-solved from ``weights`` on the
    rest and topped up, never removing more than ``structural`` weights."""
    heads = [g for g in groups if g.kind == HEADS]
    plan = {g.key: min(g.valid_removals(), key=lambda n, g=g: abs(n - ratios[g.key] * g.count)) for g in heads}
    while sum(plan[g.key] * per_unit[g.key] for g in heads) > structural:
        over = max((g for g in heads if plan[g.key]), key=lambda g: plan[g.key] - ratios[g.key] * g.count)
        plan[over.key] -= over.groups
    mlp = [g for g in groups if g.kind == MLP]
    left = structural - sum(plan[g.key] * per_unit[g.key] for g in heads)
    if mlp and left > 0:
        plan.update(_mlp_removals(mlp, per_unit, weights, left, max_ratio))
    plan.update({g.key: 0 for g in mlp if g.key not in plan})
    return plan


def _mlp_removals(mlp, per_unit, weights, left: int, max_ratio: float) -> dict[str, int]:
    """Channels per MLP group: the softmax re-scaled to ``left`` weights, floored, then topped up."""
    raw = scaled_ratios(mlp, per_unit, weights, left, max_ratio)
    wanted = {g.key: raw[g.key] * g.count for g in mlp}
    plan = {k: math.floor(v + 1e-9) for k, v in wanted.items()}
    room = {g.key: round(_cap(g, max_ratio) * g.count) for g in mlp}
    spent = sum(plan[g.key] * per_unit[g.key] for g in mlp)
    for g in sorted(mlp, key=lambda g: plan[g.key] - wanted[g.key]):  # largest fractional part first
        while plan[g.key] < room[g.key] and spent + per_unit[g.key] <= left and plan[g.key] < wanted[g.key]:
            plan[g.key] += 1
            spent += per_unit[g.key]
    for g in mlp:  # what rounding still leaves: any group with room, while a whole channel fits
        while plan[g.key] < room[g.key] and spent + per_unit[g.key] <= left:
            plan[g.key] += 1
            spent += per_unit[g.key]
    return plan


def _summed(value: torch.Tensor) -> float:
    """A float summed over ranks (each rank's stream holds its own calibration tokens)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 1.0
