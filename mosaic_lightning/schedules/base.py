"""Schedules: *when* ``MosaicPruning`` prunes. A schedule reacts to loop events and asks the callback to prune.

The callback owns the masks, the report and the engine call (``callback.prune(trainer, model, sparsity,
batches)``); a schedule only decides the moment, the sparsity and the calibration batches. Schedules are
plain classes with typed ``__init__`` arguments, so recipes select them with ``class_path``/``init_args``.
"""

from __future__ import annotations

from typing import Protocol

import lightning as L
import torch
from torch import nn

from ..core.masks import MaskStore
from ..pruning.config import PruningConfig
from ..pruning.engine import PruningOutcome


class PruningHost(Protocol):
    """What a schedule may use of the callback driving it (``MosaicPruning``); no import of the callback."""

    config: PruningConfig
    masks: MaskStore | None

    def prune(self, trainer: L.Trainer, model: nn.Module, sparsity: float, batches: list[torch.Tensor]) -> None: ...

    def adopt(self, trainer: L.Trainer, model: nn.Module, outcome: PruningOutcome) -> None: ...

    def calibration_batches(self, trainer: L.Trainer) -> list[torch.Tensor]: ...


class Schedule:
    """Base: every hook is a no-op. ``final_sparsity`` is the callback's ``sparsity``."""

    def validate(self, final_sparsity: float) -> None:
        """Raise on arguments that contradict the callback's (checked in the callback's ``__init__``)."""

    def check_run(self, callback: PruningHost, trainer: L.Trainer) -> None:
        """Raise when the schedule does not fit the run (e.g. a step range beyond ``max_steps``)."""

    @property
    def prunes_at_fit_start(self) -> bool:
        return False

    def on_train_batch_start(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module, batch) -> None:
        pass

    def on_after_backward(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        pass

    def on_train_batch_end(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        pass

    def on_train_end(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def batch_input_ids(batch) -> torch.Tensor:
    """``input_ids`` from a training batch (a dict, a tuple whose first item is the ids, or a tensor)."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return ids[0] if isinstance(ids, tuple | list) else ids
