"""Gradual magnitude-style schedule (Zhu & Gupta; SparseML's GMP): cubic ramp from initial to final sparsity.

At ``start_step``, ``start_step + every_n_steps``, ... up to ``end_step`` the model is re-pruned to

    s(t) = s_final + (s_initial - s_final) * (1 - (t - start) / (end - start)) ** 3

with fresh calibration statistics from the most recent training batches (pruned weights are zero, so they
score lowest and stay pruned as the sparsity rises).
"""

from __future__ import annotations

from collections import deque

import lightning as L
import torch
from torch import nn

from .base import PruningHost, Schedule, batch_input_ids


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """The GMP cubic schedule; ``initial`` before ``start`` and ``final`` from ``end`` on."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1 - progress) ** 3


class Gradual(Schedule):
    """Args:
    initial_sparsity: sparsity of the first pruning step (at ``start_step``).
    start_step, end_step: the optimizer-step range of the ramp; the final sparsity is reached at ``end_step``.
    every_n_steps: re-prune every this many steps inside the range.
    calibration_batches: how many of the latest training batches calibrate each pruning step.
    """

    def __init__(
        self,
        initial_sparsity: float = 0.1,
        start_step: int = 0,
        end_step: int = 100,
        every_n_steps: int = 10,
        calibration_batches: int = 4,
    ) -> None:
        if not 0 <= initial_sparsity < 1:
            raise ValueError(f"initial_sparsity={initial_sparsity}; allowed values: 0 <= initial_sparsity < 1")
        if not 0 <= start_step < end_step:
            raise ValueError(f"start_step={start_step}, end_step={end_step}; need 0 <= start_step < end_step")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}; must be >= 1")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches}; must be >= 1")
        self.initial_sparsity = initial_sparsity
        self.start_step, self.end_step, self.every_n_steps = start_step, end_step, every_n_steps
        self.recent: deque[torch.Tensor] = deque(maxlen=calibration_batches)
        self.last_pruned_step = -1  # with gradient accumulation several batches share one step

    def validate(self, final_sparsity: float) -> None:
        if final_sparsity < self.initial_sparsity:
            raise ValueError(
                f"final sparsity={final_sparsity} is below initial_sparsity={self.initial_sparsity}; a gradual "
                "schedule only raises sparsity"
            )

    def check_run(self, callback: PruningHost, trainer: L.Trainer) -> None:
        if trainer.max_steps >= 0 and self.end_step > trainer.max_steps:
            raise ValueError(
                f"Gradual end_step={self.end_step} lies outside the run (trainer.max_steps={trainer.max_steps})"
            )

    def pruning_steps(self) -> list[int]:
        steps = list(range(self.start_step, self.end_step, self.every_n_steps))
        return steps + [self.end_step]

    def sparsity_at(self, step: int, final: float) -> float:
        return cubic_sparsity(step, self.initial_sparsity, final, self.start_step, self.end_step)

    def on_train_batch_start(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module, batch) -> None:
        self.recent.append(batch_input_ids(batch).detach().cpu())
        step = trainer.global_step
        if step in self.pruning_steps() and step != self.last_pruned_step:
            self.last_pruned_step = step
            sparsity = self.sparsity_at(step, callback.config.sparsity)
            callback.prune(trainer, model, sparsity, list(self.recent))

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "last_pruned_step": self.last_pruned_step}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state.get("recent", []))
        self.last_pruned_step = state.get("last_pruned_step", -1)
