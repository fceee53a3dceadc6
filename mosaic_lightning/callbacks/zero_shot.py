"""Zero-shot accuracy of the dense and the final model inside a Lightning run (lm-eval through
:mod:`mosaic_lightning.evaluation.zero_shot`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..core.consolidate import consolidated_copy
from ..core.zero import is_partitioned
from ..evaluation.zero_shot import check_task_options, task_manager, zero_shot_accuracy
from ..trainer_access import causal_lm, find_callback
from .mosaic_pruning import MosaicPruning


class ZeroShotAccuracy(Callback):
    """lm-eval accuracy of the dense model at fit start (insert it before ``MosaicPruning``; right before the
    prune where the model is compacted before training) and, through
    :meth:`evaluate_pruned`, of the final model; ``results`` is ``{task: {"dense": metrics, "pruned": metrics}}``.

    Only global rank 0 runs lm-eval (the others wait at a barrier), so no rank repeats another's work. Under
    ZeRO-3 the dense model is partitioned: it is consolidated on rank 0's CPU first (every rank takes part). The
    dense results travel in checkpoints, as a resumed run holds pruned weights at fit start.
    """

    def __init__(self, tasks: Sequence[str] | str, include_path: str | None = None, limit: int | None = None) -> None:
        self.tasks = check_task_options(tasks, include_path, limit)
        self.manager = task_manager(self.tasks, include_path)  # fails on unknown names before any work
        self.limit = limit
        self.results: dict[str, dict[str, dict]] = {}
        self.seconds: dict[str, float] = {}
        self._undo_hook: Callable[[], None] = lambda: None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """A run that compacts before training (``MosaicPruning(compact_before_training=True)``) prunes before fit
        start, after any checkpoint is restored, so its dense model is scored right before that prune. A resumed
        run is compacted from its checkpoint without a prune, and its dense scores come with the checkpoint."""
        pruning = find_callback(trainer, MosaicPruning)
        if stage == "fit" and pruning is not None:
            self._undo_hook = pruning.run_before_dense_prune(self._score_dense_before_prune)

    def _score_dense_before_prune(self, trainer, model: nn.Module, *_) -> None:
        self._evaluate("dense", trainer, model)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._undo_hook()  # the prune before training is done, or was not needed (resumed)
        if any("dense" in phases for phases in self.results.values()):  # measured before the prune, or restored
            return
        if trainer.ckpt_path is not None and not trainer.strategy.restore_checkpoint_after_setup:
            rank_zero_warn("dense zero-shot accuracy not measured: the checkpoint holds none and the model holds "
                           "its resumed, pruned weights already")  # fmt: skip
            return
        model = causal_lm(pl_module)
        if is_partitioned(next(model.parameters())):
            model = consolidated_copy(model, None, keep=trainer.is_global_zero)
        self._evaluate("dense", trainer, model)

    def evaluate_pruned(self, trainer, model: nn.Module | None) -> None:
        """Every rank calls it; ``model`` is the final (exported) model on rank 0, and may be None elsewhere."""
        self._evaluate("pruned", trainer, model)

    def _evaluate(self, phase: str, trainer, model: nn.Module | None) -> None:
        if trainer.is_global_zero:
            clock = time.perf_counter()
            scores = zero_shot_accuracy(model, trainer.datamodule.tokenizer, self.tasks, self.manager, self.limit)
            for task, metrics in scores.items():
                self.results.setdefault(task, {})[phase] = metrics
            self.seconds[f"{phase}_tasks_s"] = time.perf_counter() - clock
        trainer.strategy.barrier(f"zero_shot_{phase}")

    def logged_metrics(self) -> dict[str, float]:
        """``{"<task>/<metric>_<dense|pruned>": value}`` of every numeric metric, for the Lightning loggers."""
        return {f"{task}/{metric}_{phase}": value
                for task, phases in self.results.items() for phase, metrics in phases.items()
                for metric, value in metrics.items() if value is not None}  # fmt: skip

    def state_dict(self) -> dict:
        return {"dense": {task: phases["dense"] for task, phases in self.results.items() if "dense" in phases}}

    def load_state_dict(self, state_dict: dict) -> None:
        for task, metrics in state_dict["dense"].items():
            self.results.setdefault(task, {})["dense"] = metrics
