"""A pruning method decides *which weights* go, from one projection's weight and calibration statistics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import Pattern
from ..stats import InputStatistics


@dataclass
class PruneResult:
    """``keep``: bool ``[out, in]`` mask. ``weight``: updated weights when the method reconstructs (SparseGPT)."""

    keep: torch.Tensor
    weight: torch.Tensor | None = None


class PruningMethod(ABC):
    """Scores weights (lower = less important) and prunes one projection to an exact count."""

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True

    @abstractmethod
    def scores(self, weight: torch.Tensor, stats: InputStatistics | None) -> torch.Tensor:
        """Importance of every weight, ``[out, in]``."""

    def prune(
        self, weight: torch.Tensor, stats: InputStatistics | None, pattern: Pattern, num_prune: int
    ) -> PruneResult:
        return PruneResult(keep=pattern.keep_mask(self.scores(weight, stats), num_prune))
