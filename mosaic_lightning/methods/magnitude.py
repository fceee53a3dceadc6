"""Magnitude pruning: ``|W|``. Needs no calibration data; the baseline every method must beat."""

from __future__ import annotations

import torch

from ..stats import InputStatistics
from .base import PruningMethod


class Magnitude(PruningMethod):
    name = "magnitude"
    needs_calibration = False

    def scores(self, weight: torch.Tensor, stats: InputStatistics | None) -> torch.Tensor:
        return weight.abs().float()
