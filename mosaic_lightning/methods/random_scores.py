"""Random baseline: every weight gets an independent uniform random score, so the pattern keeps a random subset.

The floor any real method must clear (a method that does no better than this has learnt nothing from weights or
data). Reads no statistics, so it costs no forward pass. Also the worked example of docs/adding-a-method.md:
one file, one option, nothing else in the package edited.
"""

from __future__ import annotations

import torch

from ..calibration.block import ProjectionStatistics
from .base import PruningMethod


class RandomScores(PruningMethod):
    """Uniform random scores from a generator seeded once per instance (runs are reproducible).

    Args:
        seed: seed of the score generator; the same seed gives the same masks for the same model.
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"random seed={seed!r}; must be an integer >= 0")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def scores(self, weight: torch.Tensor, stats: ProjectionStatistics) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self._generator).to(weight.device)
