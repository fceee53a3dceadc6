"""``MosaicPruning``: prune at fit start from calibration batches, then hold the masks through training."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..allocation import Allocation
from ..core.adapters import ModelAdapter
from ..core.masks import MaskStore
from ..core.report import ProjectionReport, PruningReport
from ..core.residency import BlockResidency
from ..core.zero import deepspeed_engine
from ..export.compact import compact_model
from ..methods import PruningMethod
from ..pruning.config import PruningConfig
from ..pruning.engine import PruningOutcome, prune_model, with_size_target
from ..schedules import OneShot, Schedule
from ..trainer_access import causal_lm


class MosaicPruning(L.Callback):
    """Mosaic projection pruning (and any method x allocation) as a Lightning callback.

    By default the model is pruned one-shot at fit start from calibration batches (layer-streamed); other
    schedules prune at a given step or gradually during training. After every
    optimizer step the pruned weights are set back to exactly zero and their optimizer moments cleared, so
    training never regrows them. Masks, the report and the schedule's state are saved in and restored from
    Lightning checkpoints, so a resumed run reports and exports what an uninterrupted one would.

    The LightningModule must expose its Hugging Face causal LM as ``.model`` (as :class:`~mosaic_lightning.CausalLM`
    does) or be one itself.

    Args:
        sparsity ... true_sequential: what to prune and how: the fields of
            :class:`~mosaic_lightning.PruningConfig`, documented there once. Two defaults differ from
            ``prune_model``'s: ``method="sparsegpt"`` and ``allocation="mosaic"`` (the published Mosaic system),
            because a training run is where users expect the paper's method, while the engine's defaults are the
            plain baseline.
        schedule: when to prune: ``OneShot()`` at fit start (default), ``OneShot(at_step=N)``, ``Gradual(...)``
            (cubic ramp re-scored on recent training batches); see :mod:`mosaic_lightning.schedules`.
        compact_before_training: prune in ``setup`` and remove the pruned units physically there, before Lightning
            builds the optimizer and wraps the model, so training, DDP, checkpoints and resume all see the smaller
            model (structure removal recovered by training, e.g. by distillation from the dense model: the
            ``shrink-*`` recipes). Needs ``whole_units=True`` and the one-shot schedule; not under DeepSpeed.
        num_calibration_samples: sequences to calibrate on (from the datamodule's ``calibration_batches`` or its
            train loader). None = the datamodule's own setting, else 128.
        calibration_dataloader: an explicit iterable of ``input_ids`` tensors or dicts holding them.
        device: the execution device for calibration and pruning, e.g. ``cuda``: the model stays where it is (CPU
            memory) and each decoder block, with its calibration activations, moves there while it is worked on,
            then back. None (default): where the model is.
        verbose: print the per-projection table on rank 0.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        method: str | PruningMethod = "sparsegpt",
        allocation: str | Allocation = "mosaic",
        pattern: str = "unstructured",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        min_sparsity: float = 0.0,
        max_sparsity: float = 0.99,
        structured_fraction: float = 0.0,
        structured_units: list[str] | None = None,
        structure_lambda: float = 0.08,
        uniform_structure: bool = False,
        whole_units: bool = False,
        target_params: float | None = None,
        sequential: bool = True,
        true_sequential: bool = False,
        schedule: Schedule | None = None,
        compact_before_training: bool = False,
        num_calibration_samples: int | None = None,
        calibration_dataloader: Iterable | None = None,
        device: str | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.config = PruningConfig(
            sparsity=sparsity,
            method=method,
            allocation=allocation,
            pattern=pattern,
            targets=targets,
            exclude=list(exclude or []),
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
            structured_fraction=structured_fraction,
            structured_units=list(structured_units or ["mlp", "heads"]),
            structure_lambda=structure_lambda,
            uniform_structure=uniform_structure,
            whole_units=whole_units,
            target_params=target_params,
            sequential=sequential,
            true_sequential=true_sequential,
        )
        self.schedule = schedule or OneShot()
        self.schedule.validate(self.config.sparsity)
        if target_params is not None and not isinstance(self.schedule, OneShot):
            raise ValueError(
                f"target_params prunes once, to a size; schedule={type(self.schedule).__name__} prunes to a series "
                "of sparsities: use target_params with the default OneShot(), or give sparsity with this schedule"
            )
        self.compact_before_training = compact_before_training
        if compact_before_training:
            _check_compact_before_training(self.config, self.schedule)
        if num_calibration_samples is not None and num_calibration_samples < 1:
            raise ValueError(f"num_calibration_samples={num_calibration_samples}; must be >= 1")
        self.num_calibration_samples = num_calibration_samples
        self.calibration_dataloader = calibration_dataloader
        self.device = check_device(device)
        self.verbose = verbose
        self._outcome: PruningOutcome | None = None
        self._hooks: list = []
        self._ds_step = -1  # DeepSpeed engine step whose result masks were last applied to

    # -- the pruning outcome, read-only: only this callback replaces it ------------------------------------
    @property
    def outcome(self) -> PruningOutcome | None:
        """The current pruning (masks, report, removed units, whether they are compacted away); None before."""
        return self._outcome

    @property
    def masks(self) -> MaskStore | None:
        return None if self._outcome is None else self._outcome.masks

    @property
    def report(self) -> PruningReport | None:
        return None if self._outcome is None else self._outcome.report

    @property
    def structure(self) -> dict[str, list[int]]:
        """Removed units by group key (``"3.mlp"``), for compaction."""
        return {} if self._outcome is None else self._outcome.structure

    @property
    def compacted(self) -> bool:
        return self._outcome is not None and self._outcome.compacted

    def mark_compacted(self, params_after: int, masks: MaskStore | None = None) -> None:
        """Record that the removed units are gone from the live model (``masks``: what is left to hold there)."""
        masks = self._outcome.masks if masks is None else masks
        self._outcome = dataclasses.replace(self._outcome, compacted=True, masks=masks)
        if self.report is not None:
            self.report.metrics["params_after_compaction"] = params_after

    # -- loop events ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """With ``compact_before_training``: arrange to prune and compact after Lightning has restored a checkpoint
        (if any) and before its strategy builds the optimizer and wraps the model.

        Lightning's order is ``setup`` -> ``configure_model`` -> checkpoint restore -> ``strategy.setup``
        (device, DDP wrapper, optimizers) -> ``on_fit_start``, and a callback cannot tell in ``setup`` whether a
        checkpoint follows. So the model is built now, the module's ``on_load_checkpoint`` is extended to compact
        the freshly loaded dense model to the checkpoint's structure before its compacted weights are loaded, and
        ``strategy.setup`` is preceded, once, by the prune and compaction of a fresh run."""
        if stage != "fit" or not self.compact_before_training or self.compacted:
            return
        self._check_before_work(trainer, pl_module)
        restore_load_hook = run_before(pl_module, "on_load_checkpoint", lambda ck: self._compact_like(pl_module, ck))

        def prune_and_compact(*_) -> None:
            restore_load_hook()
            if not self.compacted:  # a fresh run; a resumed one was compacted from its checkpoint
                model = causal_lm(pl_module)
                model.to(trainer.strategy.root_device)
                self.prune(trainer, model, self.config.sparsity, self.calibration_batches(trainer))
                self._compact(model)

        run_before(trainer.strategy, "setup", prune_and_compact)

    def run_before_dense_prune(self, action: Callable[..., None]) -> Callable[[], None]:
        """For callbacks that measure the dense model (call it from their ``setup``): make the prune of a fresh
        ``compact_before_training`` run call ``action(trainer, model, sparsity, batches)`` first, on the dense
        model as the strategy will see it. Returns the undo to call in ``on_fit_start`` (a resumed run is
        compacted from its checkpoint and never prunes). Any other run prunes at or after fit start, where the
        callback measures the dense model itself: nothing is hooked."""
        if not self.compact_before_training or self.compacted:
            return lambda: None
        return run_before(self, "prune", action)

    def _check_before_work(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The refusals of a ``compact_before_training`` run: its strategy, and a size target out of reach. It
        builds the model. It runs in ``setup``, before any callback's work on the dense model: those (dense
        perplexity, zero-shot scores) hook the prune, which comes after every callback's ``setup``."""
        if deepspeed_engine_expected(trainer) or trainer.strategy.restore_checkpoint_after_setup:
            raise ValueError(
                f"compact_before_training=True is not supported with strategy={type(trainer.strategy).__name__} "
                "(it shards the model before a checkpoint is restored); use a single device or DDP, or compact at "
                "fit end with CompactOnFitEnd"
            )
        build_model_now(trainer, pl_module)
        model = causal_lm(pl_module)
        with_size_target(model, ModelAdapter(model, targets=self.config.targets, exclude=self.config.exclude),
                         self.config)  # fmt: skip

    def _compact(self, model: nn.Module) -> None:
        """Remove the pruned units from ``model``: whole units only, so no mask is left to hold."""
        compact_model(model, self.structure)
        self.mark_compacted(sum(p.numel() for p in model.parameters()), MaskStore())

    def _compact_like(self, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if not state.get("structure"):
            raise ValueError(
                "the checkpoint holds no compacted structure for this MosaicPruning: it was not written by a "
                "compact_before_training run with the same callback"
            )
        self.load_state_dict(state)
        self._compact(causal_lm(pl_module))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.schedule.check_run(self, trainer)
        model = causal_lm(pl_module)
        if self.masks is not None:  # restored from a checkpoint, pruned in an earlier fit or in setup
            self.masks.enforce_(model)
            return
        if trainer.ckpt_path is not None:  # state arrives with the checkpoint (DeepSpeed restores after this)
            return
        if self.schedule.prunes_at_fit_start:
            self.prune(trainer, model, self.config.sparsity, self.calibration_batches(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.prunes_at_fit_start and self.masks is None:
            raise RuntimeError("MosaicPruning: resumed from a checkpoint that holds no pruning masks")
        model = causal_lm(pl_module)
        if self.masks is not None:
            self.masks.enforce_(model, trainer.optimizers)
        if deepspeed_engine(trainer) is not None:
            # DeepSpeed's ZeRO optimizer is no torch Optimizer (no step hooks): masks are re-applied from
            # on_train_batch_end, after Lightning's deepspeed_engine.step().
            self._ds_step = -1
            return
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step_hook(model)))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.schedule.on_train_batch_start(self, trainer, causal_lm(pl_module), batch)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.schedule.on_after_backward(self, trainer, causal_lm(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        engine = deepspeed_engine(trainer)
        if engine is not None and self.masks is not None and engine.global_steps != self._ds_step:
            # DeepSpeed stepped (once per accumulation boundary): zero pruned entries in the visible weights,
            # the fp32 master partitions and the Adam moments, each rank its own share.
            self._ds_step = engine.global_steps
            self.masks.enforce_(causal_lm(pl_module))
        self.schedule.on_train_batch_end(self, trainer, causal_lm(pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.schedule.on_train_end(self, trainer, causal_lm(pl_module))
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _after_step_hook(self, model: nn.Module):
        def hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
            if self.masks is not None:
                self.masks.enforce_(model, [optimizer])

        return hook

    # -- the pruning action (schedules decide when) ----------------------------------------------------
    def prune(self, trainer: L.Trainer, model: nn.Module, sparsity: float, batches: list[torch.Tensor]) -> None:
        """Prune ``model`` to ``sparsity`` now, replacing the masks, report and structure."""
        config = dataclasses.replace(self.config, sparsity=sparsity)
        adapter = ModelAdapter(model, targets=config.targets, exclude=config.exclude)
        residency = BlockResidency(adapter, self.device)
        progress = self.verbose and trainer.is_global_zero
        outcome = prune_model(model, batches, config, adapter, progress, residency)
        self.adopt(trainer, model, outcome)

    def adopt(self, trainer: L.Trainer, model: nn.Module, outcome: PruningOutcome) -> None:
        """Take masks, report and structure as the current pruning (from ``prune`` or a schedule's own solver,
        e.g. ADMM), so every source clears moments, logs and reports the same way."""
        self._outcome = outcome
        self.masks.adopt_(model, trainer.optimizers)  # DeepSpeed: the pruned weights into its fp32 masters too
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/achieved_sparsity": self.report.achieved_sparsity}, step=trainer.global_step)
        if self.verbose:
            rank_zero_info(self.report.format_table())

    # -- calibration data -------------------------------------------------------------------------------
    def calibration_batches(self, trainer: L.Trainer) -> list[torch.Tensor]:
        """This rank's calibration batches. Under DDP each rank takes every world_size-th batch, and the
        engine sums statistics over ranks, so all ranks derive the same masks from all ranks' batches."""
        if self.calibration_dataloader is not None:
            return _shard(_take_samples(self.calibration_dataloader, self.num_calibration_samples or 128), trainer)
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "calibration_batches"):
            return _shard(datamodule.calibration_batches(self.num_calibration_samples), trainer)
        trainer.fit_loop.setup_data()
        if trainer.train_dataloader is None:
            raise ValueError("MosaicPruning: no calibration data; pass calibration_dataloader or a train dataloader")
        # Lightning's distributed sampler already gives each rank its own share of the train loader.
        return _take_samples(trainer.train_dataloader, self.num_calibration_samples or 128)

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "masks": None if self.masks is None else self.masks.state_dict(),
            "structure": self.structure,
            "schedule": self.schedule.state_dict(),
            "report": None if self.report is None else dataclasses.asdict(self.report),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        _check_same_config(state_dict.get("config"), self.config.to_dict())
        self.schedule.load_state_dict(state_dict.get("schedule", {}))
        if state_dict.get("masks") is None:
            return
        masks = MaskStore()
        masks.load_state_dict(state_dict["masks"])
        report = state_dict.get("report")  # a resumed run reports and exports what the pruning run measured
        report = None if report is None else _report_from_state(report)
        # whether the live model is compacted is this process's fact (set by setup), not the checkpoint's
        self._outcome = PruningOutcome(masks, report, state_dict.get("structure", {}), self.compacted)


def _check_same_config(saved: dict | None, current: dict) -> None:
    """A resumed run holds the checkpoint's pruning; options that differ from it would be reported and exported
    as if they had made it. An option the checkpoint's version did not have yet had its default then."""
    if saved is None:
        return
    saved = {**PruningConfig().to_dict(), **saved}
    differ = [f"{key}={saved[key]!r} there, {value!r} here" for key, value in current.items() if saved[key] != value]
    if not differ:
        return
    raise ValueError(
        f"the checkpoint was pruned with other MosaicPruning options ({'; '.join(differ)}): resume with the "
        "options of the run that wrote it"
    )


def _check_compact_before_training(config: PruningConfig, schedule: Schedule) -> None:
    if not config.whole_units:
        raise ValueError(
            "compact_before_training=True needs whole_units=True (with structured_fraction=1): only whole units "
            "can be removed physically, and single pruned weights would have no place in the compacted model"
        )
    if not schedule.prunes_at_fit_start:
        raise ValueError(
            f"compact_before_training=True prunes once before training; schedule={type(schedule).__name__} prunes "
            "later or gradually: use the default OneShot()"
        )


def deepspeed_engine_expected(trainer: L.Trainer) -> bool:
    """Whether the run's strategy is DeepSpeed (before its engine exists, e.g. in ``setup``)."""
    return "deepspeed" in type(trainer.strategy).__name__.lower()


def run_before(owner: object, name: str, action: Callable[..., None]) -> Callable[[], None]:
    """Make ``owner.<name>`` run ``action`` with the same arguments first, once, then be itself again; returns
    a function that undoes it if the call never came. Undoing twice, or after the call, does nothing; a wrapper
    that another one has wrapped since stays in that chain but no longer acts."""
    had_own = name in vars(owner)
    original = getattr(owner, name)
    pending = True

    def restore() -> None:
        nonlocal pending
        pending = False
        if vars(owner).get(name) is not wrapper:
            return
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)

    def wrapper(*args, **kwargs):
        if pending:
            restore()
            action(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    return restore


def check_device(device: str | None, field: str = "device") -> str | None:
    """A device torch knows and this machine has (refused at construction, before any work)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{field}={device!r} is not a torch device; e.g. cpu, cuda, cuda:1") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}={device!r}, but torch sees no CUDA device here; use cpu or leave it unset")
    return device


def build_model_now(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Build a model that loads in ``configure_model`` (as :class:`~mosaic_lightning.CausalLM`) already in a
    ``setup`` hook, inside the strategy's init contexts as Lightning would. Lightning requires ``configure_model``
    to be idempotent, so its own call afterwards is a no-op."""
    if getattr(pl_module, "model", None) is not None:
        return
    with (
        trainer.strategy.tensor_init_context(),
        trainer.strategy.model_sharded_context(),
        trainer.precision_plugin.module_init_context(),
    ):
        pl_module.configure_model()


def _report_from_state(state: dict) -> PruningReport:
    """The report from its ``dataclasses.asdict`` form (plain containers: loads with ``weights_only=True``)."""
    projections = [ProjectionReport(**p) for p in state.get("projections", [])]
    return PruningReport(**{**state, "projections": projections})


def _shard(batches: list[torch.Tensor], trainer: L.Trainer) -> list[torch.Tensor]:
    world, rank = trainer.world_size, trainer.global_rank
    if world == 1:
        return batches
    if len(batches) < world:
        raise ValueError(f"{len(batches)} calibration batches cannot be shared by {world} ranks; give more samples")
    return batches[rank::world]


def _take_samples(source: Iterable, num_samples: int) -> list[torch.Tensor]:
    batches, seen = [], 0
    for batch in itertools.islice(source, num_samples):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        ids = ids[0] if isinstance(ids, tuple | list) else ids
        ids = ids[: num_samples - seen]
        batches.append(ids)
        seen += ids.shape[0]
        if seen >= num_samples:
            break
    if not batches:
        raise ValueError("MosaicPruning: the calibration set is empty (the dataloader yielded no batch)")
    return batches
