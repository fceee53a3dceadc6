"""One-shot pruning at fit start (the default) or at a given optimizer step."""

from __future__ import annotations

import lightning as L
from torch import nn

from .base import PruningHost, Schedule


class OneShot(Schedule):
    """Prune once to the final sparsity, from the callback's calibration data.

    Args:
        at_step: 0 = at fit start (before any training step); N = just before optimizer step N.
    """

    def __init__(self, at_step: int = 0) -> None:
        if at_step < 0:
            raise ValueError(f"at_step={at_step}; must be >= 0")
        self.at_step = at_step

    @property
    def prunes_at_fit_start(self) -> bool:
        return self.at_step == 0

    def check_run(self, callback: PruningHost, trainer: L.Trainer) -> None:
        if self.at_step > 0 and 0 <= trainer.max_steps <= self.at_step:
            raise ValueError(
                f"OneShot at_step={self.at_step} lies outside the run (trainer.max_steps={trainer.max_steps})"
            )

    def on_train_batch_start(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module, batch) -> None:
        if self.at_step > 0 and trainer.global_step == self.at_step and callback.masks is None:
            callback.prune(trainer, model, callback.config.sparsity, callback.calibration_batches(trainer))
