"""StructPrune (Song, Bai and Zhao, 2025): whole MLP channels and attention heads removed through ADMM-coordinated
subproblems of one module each. No public code exists; this follows the abstract (``../shared/seeds``) and
SparseLLM's auxiliary-variable decomposition, and every choice the paper leaves open is listed below.
The per-layer structured ratio is the allocation's job: :class:`~mosaic_lightning.allocation.EnergySoftmax`.

Units are :mod:`..structure`'s unit groups: MLP channel ``c`` = row ``c`` of gate and up + column ``c`` of down;
query head ``h`` = its ``head_dim`` rows of q (and of k, v without GQA) + its columns of o; under grouped-query
attention heads go in equal numbers per key/value group.

**The coordinated objective.** SparseLLM splits a block at its auxiliary variables: the consumer module ``C``
(down for MLP channels, o for heads) reads ``P`` (``act(gate x) * up x``, or the heads' attention outputs), and
the producers (gate/up, q) must reproduce their targets ``s = W_gate x``, ``z = W_up x``. With a structured mask
that is shared across the modules a unit couples, the producers' subproblems are solved exactly by their dense
rows on the units kept, and a removed unit's rows force ``P_u = 0`` through the coupling constraint
``p = act(s) * z``. What is left to optimise is ``C``'s subproblem on its own input::

    min_W  f(W) = ||W P - W0 P||^2 / N = tr((W - W0) H (W - W0)^T),   H = P P^T / N,
    s.t.   W has k whole units (column blocks) zero.

Its memory is one module: ``C``'s weight and its input Gram ``H`` (1536^2 floats for SmolLM2's down).

**ADMM** (scaled form, penalty in the metric ``D`` = ``H`` restricted to each unit's diagonal block)::

    W <- argmin_W f(W) + rho/2 ||W - Z + U||_D^2  =  (W0 H + rho/2 (Z - U) D) (H + rho/2 D)^-1
    Z <- Proj(W + U)                               (closed form, below)
    U <- (U + W - Z) / growth,  rho <- rho * growth   (U rescaled with rho, as scaled ADMM requires)

**The closed-form mask** (:func:`project`): ``D`` is block-diagonal over units, so ``||Z - V||_D^2`` separates
over units; the minimiser over the mask keeps every kept unit's ``V_u`` and pays ``c_u = tr(V_u D_uu V_u^T)``
for a removed one, so the exact optimum removes the ``k`` lowest ``c_u`` (per key/value group under GQA).
``tests/test_structprune.py`` checks it against a brute-force search over every unit subset. The removed units
are those of the last Z-step.

**Final weights.** ``C`` is refit by least squares on its kept columns, ``W_K = W0 H[:, K] H_KK^-1``: the exact
minimiser of ``f`` on the chosen support (ADMM's fixed point as ``rho -> inf``). Producers keep their dense
rows; removed slices are zero, so :mod:`..compact` removes them physically with the function unchanged.

Choices where the paper is silent:

- ``H`` is damped by ``damp * mean(diag H)`` (as SparseGPT) before any solve; ``rho`` starts at ``rho`` and grows
  by ``growth`` for ``iterations`` rounds (defaults 0.1, 1.5, 10: the last penalty is 3.8x the data term's scale,
  so ``W`` and ``Z`` have met).
- The heads' Gram ``H`` is measured with the block dense (the engine's one statistics pass), like every other
  method here: attention and MLP see the same block inputs.
- Weights left after whole units (``structured_fraction < 1``, or the residue that unit sizes leave so the total
  is exact) are pruned one by one with Wanda scores on the final weights, among those the units leave.
- Needs whole units: with ``structured_fraction = 0`` (no units planned) it refuses, instead of silently being
  Wanda.

Memory: one module's weight, ``H``, ``D`` and ADMM's ``W``, ``Z``, ``U`` (all ``C``-sized) at a time. Under
DDP/ZeRO-3 ``H`` is summed over ranks by the engine's statistics pass and weights are read inside
``block.gathered``, so every rank derives the same units and weights.
"""

from __future__ import annotations

import torch

from ..calibration.block import BlockContext, ProjectionStatistics, PruneResult
from ..core.structure import UnitGroup, choose_removed
from ..core.validation import check_int, check_positive
from .base import PruningMethod
from .wanda import wanda_scores


class StructPrune(PruningMethod):
    """StructPrune's structured mask and reconstruction; see the module docstring.

    Args:
        iterations: ADMM rounds per unit group (W-step, closed-form Z-step, dual update).
        rho: initial penalty, relative to the data term (the metric ``D`` carries the scale).
        growth: factor on ``rho`` after every round (>= 1).
        damp: relative damping of the consumer's input Gram before solves.
    """

    name = "structprune"

    def __init__(self, iterations: int = 10, rho: float = 0.1, growth: float = 1.5, damp: float = 0.01) -> None:
        check_int("structprune iterations", iterations, 1)
        check_positive("structprune rho", rho)
        check_positive("structprune damp", damp)
        check_positive("structprune growth", growth)
        if growth < 1:
            raise ValueError(f"structprune growth={growth!r}; must be >= 1 (the penalty never shrinks)")
        self.iterations, self.rho, self.growth, self.damp = iterations, float(rho), float(growth), float(damp)

    def scores(self, weight: torch.Tensor, stats: ProjectionStatistics) -> torch.Tensor:
        """Wanda scores: used for the single weights left after whole units."""
        return wanda_scores(weight, stats.column_norms)

    def select_units(self, block: BlockContext, group: UnitGroup, num_remove: int) -> list[int]:
        """The units the ADMM's last closed-form Z-step removes from the consumer (down/o) of ``group``."""
        if num_remove == 0:
            return []
        consumer = next(p for p in block.projections if p.name == group.cols[0])
        hessian = damped(block.stats(consumer).hessian, self.damp)
        with block.gathered(consumer):
            weight = consumer.weight_view().detach().float().clone()
        return self.admm(weight, hessian, group, num_remove)

    def admm(self, weight: torch.Tensor, hessian: torch.Tensor, group: UnitGroup, num_remove: int) -> list[int]:
        """Scaled ADMM on ``tr((W - W0) H (W - W0)^T)`` s.t. ``num_remove`` units zero; the removed units."""
        metric = unit_blocks(hessian, group.size)
        target = weight @ hessian
        z, removed = project(weight, metric, group, num_remove)
        u = torch.zeros_like(weight)
        rho = self.rho
        for _ in range(self.iterations):
            system = hessian + rho / 2 * metric  # symmetric positive definite: H is damped
            w = torch.linalg.solve(system, (target + rho / 2 * (z - u) @ metric).t()).t()
            z, removed = project(w + u, metric, group, num_remove)
            u = (u + w - z) / self.growth
            rho *= self.growth
        return removed

    def prune_block(self, block: BlockContext) -> dict[str, PruneResult]:
        if not block.structural:
            raise ValueError(
                "structprune removes whole units, but none are planned for layer "
                f"{block.layer}: set structured_fraction > 0 (the structprune recipes use 1.0)"
            )
        return {proj.key: self._prune_projection(block, proj) for proj in block.projections}

    def _prune_projection(self, block: BlockContext, proj) -> PruneResult:
        """Consumers refit on their kept columns, producers as they are; then the planned single weights."""
        structural = block.structural.get(proj.key)
        with block.gathered(proj):
            weight = proj.weight_view().detach().float().clone()
        if structural is None:
            structural = torch.ones_like(weight, dtype=torch.bool)
        rows = structural.any(dim=1).nonzero().squeeze(1)
        cols = structural.any(dim=0).nonzero().squeeze(1)
        if len(cols) < weight.shape[1]:
            weight = refit(weight, damped(block.stats(proj).hessian, self.damp), cols)
        stats = block.stats(proj)
        sub = block.pattern.keep_mask(
            wanda_scores(weight[rows][:, cols], stats.column_norms[cols]), block.num_prune[proj.key]
        )
        keep = torch.zeros_like(structural)
        keep[rows[:, None], cols[None, :]] = sub
        return PruneResult(keep=keep, weight=weight.masked_fill(~keep, 0).to(proj.weight.dtype))


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) I`` (float32): keeps every solve well posed where inputs are dead."""
    hessian = hessian.float()
    scale = damp * hessian.diagonal().mean().clamp(min=1e-12)
    return hessian + scale * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)


def unit_blocks(hessian: torch.Tensor, size: int) -> torch.Tensor:
    """``H`` restricted to each unit's ``size x size`` diagonal block (cross-unit entries zero)."""
    units = torch.arange(hessian.shape[0], device=hessian.device) // size
    return hessian * (units[:, None] == units[None, :])


def unit_costs(value: torch.Tensor, metric: torch.Tensor, size: int) -> torch.Tensor:
    """``c_u = tr(V_u D_uu V_u^T)`` for every unit (``metric`` block-diagonal over units)."""
    per_column = (value * (value @ metric)).sum(dim=0)
    return per_column.view(-1, size).sum(dim=1)


def project(value: torch.Tensor, metric: torch.Tensor, group: UnitGroup, num_remove: int):
    """Closed-form ``argmin_Z ||Z - V||_D^2`` over ``Z`` with ``num_remove`` whole units (columns) zero, equal
    numbers per GQA group: remove the lowest unit costs. Returns ``(Z, removed units)``."""
    removed = choose_removed(group, unit_costs(value, metric, group.size), num_remove)
    columns = torch.ones(value.shape[1], dtype=torch.bool, device=value.device)
    for unit in removed:
        columns[unit * group.size : (unit + 1) * group.size] = False
    return value * columns[None, :], removed


def refit(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Least squares on the kept columns: ``W_K = W0 H[:, K] H_KK^-1``, other columns zero."""
    solved = torch.linalg.solve(hessian[kept][:, kept], (weight @ hessian[:, kept]).t()).t()
    out = torch.zeros_like(weight)
    out[:, kept] = solved
    return out
