"""A pruning method decides *which weights* go. The contract, from smallest to largest:

- ``scores(weight, stats)``: the importance of every weight of one ``[out, in]`` projection (lower goes first).
  A subclass that implements only this is a complete method: the default ``prune`` keeps the highest scores
  under the pattern at the planned count.
- ``prune(weight, stats, pattern, num_prune)``: choose the mask (and optionally new kept weights, as SparseGPT)
  for one projection.
- ``prune_block(block)``: prune a whole decoder block at once, e.g. jointly across its MLP (SparseLLM). The
  default calls ``prune`` for each projection through :meth:`BlockContext.prune_projection`.
- ``select_units(block, group, num_remove)``: under composite/structured pruning, which whole units (MLP
  channels, heads) of a block go, before ``prune_block``. The default removes the lowest summed ``scores`` of
  their input columns in down/o; a method with its own structured criterion (StructPrune) overrides it.

``stats`` is lazy (:class:`~mosaic_lightning.calibration.block.ProjectionStatistics`): ``stats.column_norms`` and
``stats.hessian`` are computed the first time a method reads them, so a method pays for exactly what it uses.
Options are the subclass's own typed ``__init__`` arguments, validated there.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from ..calibration.block import BlockContext, ProjectionStatistics, PruneResult
from ..core.components import Component
from ..core.patterns import Pattern
from ..core.structure import UnitGroup, choose_removed

__all__ = ["PruneResult", "PruningMethod"]


class PruningMethod(Component):
    """Base of every pruning method; see the module docstring for the three levels of the contract."""

    @abstractmethod
    def scores(self, weight: torch.Tensor, stats: ProjectionStatistics) -> torch.Tensor:
        """Importance of every weight, ``[out, in]``, higher = more important."""

    def prune(self, weight: torch.Tensor, stats: ProjectionStatistics, pattern: Pattern, num_prune: int) -> PruneResult:
        return PruneResult(keep=pattern.keep_mask(self.scores(weight, stats), num_prune))

    def prune_block(self, block: BlockContext) -> dict[str, PruneResult]:
        """Results by projection key for every projection of ``block`` (each with ``block.num_prune[key]``
        single weights pruned among those whole units left, ``block.structural``)."""
        return {proj.key: block.prune_projection(proj, self.prune) for proj in block.projections}

    def select_units(self, block: BlockContext, group: UnitGroup, num_remove: int) -> list[int]:
        """Sorted indices of the ``num_remove`` units of ``group`` to remove (equal numbers per GQA group): by
        default the lowest summed ``scores`` of their input columns in the consumer (down/o)."""
        consumer = next(p for p in block.projections if p.name == group.cols[0])
        with block.gathered(consumer):
            columns = self.scores(consumer.weight_view(), block.stats(consumer)).sum(dim=0)
        return choose_removed(group, columns.view(group.count, group.size).sum(dim=1), num_remove)
