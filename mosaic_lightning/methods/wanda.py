"""Wanda (Sun et al., 2023): ``S_ij = |W_ij| * ||X_j||_2``; no weight update."""

from __future__ import annotations

import torch

from ..calibration.block import ProjectionStatistics
from .base import PruningMethod


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    return weight.abs().float() * column_norms.to(weight.device)[None, :]


class Wanda(PruningMethod):
    name = "wanda"

    def scores(self, weight: torch.Tensor, stats: ProjectionStatistics) -> torch.Tensor:
        return wanda_scores(weight, stats.column_norms)
