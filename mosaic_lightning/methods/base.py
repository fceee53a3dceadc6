"""A pruning method decides *which weights* go. The contract, from smallest to largest:

- ``scores(weight, stats)``: the importance of every weight of one ``[out, in]`` projection (lower goes first).
  A subclass that implements only this is a complete method: the default ``prune`` keeps the highest scores
  under the pattern at the planned count.
- ``prune(weight, stats, pattern, num_prune)``: choose the mask (and optionally new kept weights, as SparseGPT)
  for one projection.
- ``prune_block(block)``: prune a whole decoder block at once, e.g. jointly across its MLP (SparseLLM). The
  default calls ``prune`` for each projection through :meth:`BlockContext.prune_projection`.

``stats`` is lazy (:class:`~mosaic_lightning.block.ProjectionStatistics`): ``stats.column_norms`` and
``stats.hessian`` are computed the first time a method reads them, so a method pays for exactly what it uses.
Options are the subclass's own typed ``__init__`` arguments, validated there.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from ..block import BlockContext, ProjectionStatistics, PruneResult
from ..components import Component
from ..patterns import Pattern

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
