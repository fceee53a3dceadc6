"""Magnitude pruning: ``|W|``. Reads no statistics, so it costs no forward pass; the baseline every method must beat."""

from __future__ import annotations

import torch

from ..calibration.block import ProjectionStatistics
from .base import PruningMethod


class Magnitude(PruningMethod):
    name = "magnitude"

    def scores(self, weight: torch.Tensor, stats: ProjectionStatistics) -> torch.Tensor:
        return weight.abs().float()
