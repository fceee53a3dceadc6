"""ADMM pruning as Elsa publishes it: constrain the real training loss to the sparse set, then hard-prune.

One-shot methods prune against a layer-wise reconstruction proxy. ADMM instead solves ``min f(W) s.t. W in S`` on
the training loss ``f`` itself; the solver's steps (the penalty gradient, ``Z = Proj(W + U)``, ``U = U + W - Z``,
the dual's rescaling when ``lambda`` changes, the final support) are in :mod:`mosaic_lightning.recovery.admm`.
This schedule decides when each runs in a Lightning fit:

    x-step  the optimizer's own steps: the penalty's gradient joins ``W.grad`` inside the optimizer step, after
            gradient clipping (as Elsa's ``ADMMOptimizer`` does), so clipping never scales it, and once per
            optimizer step whatever the gradient accumulation
    z/u     every ``projection_every`` optimizer steps, from the step ADMM starts (``Z = Proj(W)``, ``U = 0``),
            once per step however many batches end on it; ``lambda`` follows ``rho_schedule`` from there
    prune   at ``end_step`` (or at train end) the weights are hard-pruned to the support of ``Proj(W)`` and the
            callback holds the masks from then on: training after ``end_step`` is a masked fine-tune (off by
            default, as in Elsa)

``Proj`` keeps the largest scores under the callback's pattern with the exact per-projection counts of the
engine's planner (the callback's allocation): Elsa projects per tensor (pattern ``unstructured-layer``, as
``recipes/admm-80.yaml`` sets); ``unstructured`` projects per row, ``N:M`` per group. The score is ``|W + U|``
(the Euclidean projection onto S), or with ``projection="objective"`` Elsa's objective-aware ``v (W + U)^2``, ``v``
the optimizer's second moment (Adam's ``exp_avg_sq``; ``Z0`` is by magnitude since no moment exists yet).

Elsa's optimizer (Adam, betas (0.9, 0.95), no weight decay, lr 2e-4 decaying linearly to 0, no warmup, clip 1.0)
is the LightningModule's, not this schedule's: :class:`~mosaic_lightning.CausalLM` takes ``betas`` and
``lr_schedule="linear"`` and ``recipes/admm-80.yaml`` sets them.

Memory: ``Z`` and ``U`` are fp32 copies of every targeted weight on its device, i.e. 8 extra bytes per targeted
weight: twice the targeted weights in fp32, four times in bf16 (Elsa-L quantises this state; not done here).
Runs on one device, DDP and DeepSpeed ZeRO-1/2/3; every rank holds the same whole ``Z``/``U``. Under DeepSpeed
the weights are its fp32 masters and the penalty joins the reduced fp32 gradient in the optimizer's partitions,
once per accumulation boundary, before DeepSpeed's own step: DeepSpeed clips inside that step, so there (only)
the penalty is clipped with the loss gradient; ``projection="objective"`` is refused there (the moments are
partitioned). Reading either assembles one parameter at a time from all ranks. FSDP is refused.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..allocation import Uniform
from ..core.adapters import ModelAdapter, Projection
from ..core.report import PruningReport
from ..core.validation import check_int, check_positive
from ..core.zero import deepspeed_engine, full_fp32
from ..methods import Magnitude
from ..pruning.config import PruningConfig
from ..pruning.engine import PruningOutcome, commit_masks, plan_pruning, projection_report
from ..recovery.admm import RHO_SCHEDULES, ADMMSolver, MomentOf, penalty_weight, sparse_projection
from ..trainer_access import causal_lm
from .base import PruningHost, Schedule

# The solver's formulas stay importable from here, where they were first defined.
__all__ = ["ADMM", "PROJECTIONS", "RHO_SCHEDULES", "penalty_weight", "sparse_projection"]

_UNSUPPORTED_STRATEGIES = (FSDPStrategy, ModelParallelStrategy)
PROJECTIONS = ("magnitude", "objective")


class ADMM(Schedule):
    """ADMM (Elsa) during training, hard-pruned at ``end_step``; see the module docstring for the algorithm.

    The projection scores magnitude (or the objective-aware ``v W^2``) by construction, so the callback's
    ``method`` is not used; its ``sparsity``, ``allocation``, ``pattern``, ``targets`` and ``exclude`` are.
    Composite (structured) pruning is not supported. ``solver`` holds ``Z``, ``U``, the counts and the current
    ``lambda``; ``z``, ``u``, ``counts``, ``current_rho`` and ``num_projections`` read them.

    Args:
        rho: the penalty weight ``lambda`` of ``lambda/2 ||W - Z + U||^2`` (Elsa: 0.01), its final value under a
            ``rho_schedule``; larger pulls ``W`` to the sparse set faster at the cost of the loss.
        projection_every: optimizer steps between z/u updates (Elsa: 32).
        start_step: optimizer step at which ADMM starts (``Z = Proj(W)``, ``U = 0``); before it, plain training.
        end_step: optimizer step after which the model is hard-pruned; None = the run's last step (``max_steps``,
            or train end for epoch-bounded runs). Training after it keeps the pruned weights at zero.
        rho_schedule: ``constant`` (Elsa's default), or ``linear`` / ``cosine`` / ``exponential`` from
            ``rho_start`` to ``rho`` over the ADMM steps (updated at each z/u step); needs a known end step.
        rho_start: the schedule's first penalty weight (>= 0).
        projection: ``magnitude`` (``|W + U|``, Elsa's default) or ``objective`` (``v (W + U)^2`` with Adam's
            second moment ``v``).
    """

    def __init__(
        self,
        rho: float = 0.01,
        projection_every: int = 32,
        start_step: int = 0,
        end_step: int | None = None,
        rho_schedule: Literal["constant", "linear", "cosine", "exponential"] = "constant",
        rho_start: float = 0.0,
        projection: Literal["magnitude", "objective"] = "magnitude",
    ) -> None:
        check_positive("ADMM rho", rho)
        check_int("ADMM projection_every", projection_every, 1)
        check_int("ADMM start_step", start_step, 0)
        if end_step is not None:
            check_int("ADMM end_step", end_step, start_step + 1)
        if rho_schedule not in RHO_SCHEDULES:
            raise ValueError(f"ADMM rho_schedule={rho_schedule!r}; allowed values: {', '.join(RHO_SCHEDULES)}")
        if isinstance(rho_start, bool) or not isinstance(rho_start, int | float) or not 0 <= rho_start < math.inf:
            raise ValueError(f"ADMM rho_start={rho_start!r}; must be a finite number >= 0")
        if projection not in PROJECTIONS:
            raise ValueError(f"ADMM projection={projection!r}; allowed values: {', '.join(PROJECTIONS)}")
        self.rho, self.projection_every = float(rho), projection_every
        self.start_step, self.end_step = start_step, end_step
        self.rho_schedule, self.rho_start, self.projection = rho_schedule, float(rho_start), projection
        self._reset()
        self._end: int | None = end_step  # end_step resolved against the run in check_run
        self._adapter: ModelAdapter | None = None
        self._optimizers: list[torch.optim.Optimizer] = []

    def _reset(self) -> None:
        self.solver = ADMMSolver(self.rho)
        self.ratios: dict[str, float] = {}
        self.started_at: int | None = None  # global step at which Z, U were initialised
        self.last_projection_step = -1  # with gradient accumulation several batches end on one step
        self.finished = False
        self.seconds = 0.0  # wall time spent in penalty and projections

    @property
    def active(self) -> bool:
        return self.started_at is not None and not self.finished

    # -- the solver's state, read-only ---------------------------------------------------------------------
    @property
    def z(self) -> dict[str, torch.Tensor]:
        return self.solver.z

    @property
    def u(self) -> dict[str, torch.Tensor]:
        return self.solver.u

    @property
    def counts(self) -> dict[str, int]:
        return self.solver.counts

    @property
    def current_rho(self) -> float:
        return self.solver.rho

    @property
    def num_projections(self) -> int:
        return self.solver.num_projections

    # -- checks ------------------------------------------------------------------------------------------
    def check_run(self, callback: PruningHost, trainer: L.Trainer) -> None:
        if isinstance(trainer.strategy, _UNSUPPORTED_STRATEGIES):
            raise ValueError(
                f"ADMM supports a single device, DDP and DeepSpeed; strategy={type(trainer.strategy).__name__} "
                "is not supported"
            )
        if not self.finished:
            self._check_model(callback, trainer)
        self._check_steps(trainer)
        self._check_deepspeed(trainer)

    def _check_steps(self, trainer: L.Trainer) -> None:
        max_steps = trainer.max_steps
        if self.end_step is not None and 0 <= max_steps < self.end_step:
            raise ValueError(f"ADMM end_step={self.end_step} lies outside the run (trainer.max_steps={max_steps})")
        self._end = self.end_step if self.end_step is not None else (max_steps if max_steps >= 0 else None)
        if not self.finished and self._end is not None and self.start_step >= self._end:
            raise ValueError(
                f"ADMM start_step={self.start_step} leaves no step before ADMM ends at step {self._end} "
                f"(trainer.max_steps={max_steps}); lower start_step or raise max_steps"
            )
        if self.rho_schedule != "constant" and self._end is None:
            raise ValueError(
                f"ADMM rho_schedule={self.rho_schedule!r} needs the run's last step: set end_step or trainer.max_steps"
            )

    def _check_deepspeed(self, trainer: L.Trainer) -> None:
        if type(trainer.strategy).__name__ != "DeepSpeedStrategy":
            return
        if self.projection == "objective":
            raise ValueError(
                "ADMM projection='objective' reads the optimizer's second moments, which DeepSpeed partitions; "
                "use projection='magnitude' under DeepSpeed"
            )
        if trainer.gradient_clip_val:
            rank_zero_warn(
                "ADMM under DeepSpeed: DeepSpeed clips gradients inside its own step, so the ADMM penalty is "
                "clipped with the loss gradient (Elsa adds it after clipping, as ADMM does on other strategies)"
            )

    def _check_model(self, callback: PruningHost, trainer: L.Trainer) -> None:
        """Fail at fit start, before any step, on a configuration the ADMM solver cannot honour."""
        config = callback.config
        if config.structured:
            raise ValueError(
                f"structured_fraction={config.structured_fraction}: the ADMM schedule projects single weights "
                "only; composite pruning is not supported with it (set structured_fraction=0)"
            )
        self._check_projections(self._adapter_for(causal_lm(trainer.lightning_module), config), config)
        if not isinstance(config.method, Magnitude):
            rank_zero_warn(f"ADMM projects by {self.projection} scores; method={config.method!r} is not used")

    def _check_projections(self, adapter: ModelAdapter, config: PruningConfig) -> None:
        """Every target takes the pattern and is trained; a resumed state covers exactly these targets."""
        pattern = config.parsed_pattern
        for proj in adapter.all_projections():
            pattern.check_shape(proj.in_features, adapter.module_name(proj))
            if not proj.weight.requires_grad:
                raise ValueError(
                    f"ADMM trains the targeted weights toward the sparse set, but {adapter.module_name(proj)} is "
                    "frozen (requires_grad=False, e.g. under LoRA); unfreeze it or use a OneShot schedule"
                )
        keys = {p.key for p in adapter.all_projections()}
        if self.started_at is not None and set(self.z) != keys:
            raise ValueError(
                f"the checkpoint's ADMM state covers {len(self.z)} projections, but targets={config.targets!r} "
                f"with exclude={config.exclude!r} select {len(keys)}; resume with the targets of the run that started"
            )

    # -- loop events -------------------------------------------------------------------------------------
    def on_train_batch_start(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module, batch) -> None:
        if self.started_at is None and not self.finished and trainer.global_step >= self.start_step:
            clock = time.perf_counter()
            self._start(callback, trainer, model)
            self.seconds += time.perf_counter() - clock
        if self.active and deepspeed_engine(trainer) is None:
            self._wrap_optimizer_steps(trainer, model, callback.config)

    def on_after_backward(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        engine = deepspeed_engine(trainer)
        if not self.active or engine is None or not engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed reduces gradients into its fp32 partitions at the boundary: the penalty joins there
        clock = time.perf_counter()
        self.solver.add_penalty_grad(self._adapter_for(model, callback.config), _deepspeed_grad_scale(trainer, engine))
        self.seconds += time.perf_counter() - clock

    def on_train_batch_end(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        if not self.active:
            return
        step = trainer.global_step
        if step != self.last_projection_step and (step - self.started_at) % self.projection_every == 0:
            self.last_projection_step = step
            clock = time.perf_counter()
            adapter = self._adapter_for(model, callback.config)
            self.solver.z_u_step(adapter, callback.config.parsed_pattern, self._moment_of())
            self._update_rho(step)
            self.seconds += time.perf_counter() - clock
        if self._end is not None and step >= self._end:
            self._finish(callback, trainer, model)

    def on_train_end(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        if not self.finished:
            self._finish(callback, trainer, model)

    # -- the penalty, inside the optimizer step ----------------------------------------------------------
    def _wrap_optimizer_steps(self, trainer: L.Trainer, model: nn.Module, config: PruningConfig) -> None:
        """Make each optimizer add the penalty after the gradient is final: Lightning passes ``step`` a closure
        that runs backward and then clips, so the penalty goes in after that closure returns (or, when the closure
        has already run, as with a 16-bit GradScaler, before the step proper). Once per optimizer, idempotent."""
        self._optimizers = list(trainer.optimizers)
        for optimizer in self._optimizers:
            if getattr(optimizer.step, "admm_schedule", None) is self:
                continue
            optimizer.step = self._penalised_step(optimizer.step, model, config)

    def _penalised_step(self, step, model: nn.Module, config: PruningConfig):
        def penalised_step(closure=None, **kwargs):
            def add_penalty() -> None:
                if self.active:
                    clock = time.perf_counter()
                    self.solver.add_penalty_grad(self._adapter_for(model, config))
                    self.seconds += time.perf_counter() - clock

            if closure is None:
                add_penalty()
                return step(**kwargs)

            def closure_with_penalty():
                loss = closure()
                add_penalty()
                return loss

            return step(closure=closure_with_penalty, **kwargs)

        penalised_step.admm_schedule = self
        return penalised_step

    # -- the solver's steps, at their moments -------------------------------------------------------------
    @torch.no_grad()
    def _start(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        """``Z = Proj(W)``, ``U = 0``, with the exact counts fixed for the whole run."""
        config = callback.config
        adapter, pattern = self._adapter_for(model, config), config.parsed_pattern
        self._plan(callback, trainer, model, adapter)
        self.started_at = self.last_projection_step = trainer.global_step
        self.solver.start(adapter, pattern, self._rho_at(trainer.global_step))

    def _plan(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module, adapter: ModelAdapter) -> None:
        """Exact counts from the engine's planner: the callback's allocation, measured on its calibration batches
        (only an allocation that reads data, e.g. OWL or Mosaic, runs a calibration pass)."""
        config = callback.config
        batches = [] if isinstance(config.allocation, Uniform) else callback.calibration_batches(trainer)
        plan = plan_pruning(model, adapter, batches, config, progress=False)
        self.solver.counts, self.ratios = plan.counts, plan.ratios

    def _rho_at(self, step: int) -> float:
        total = (self._end - self.started_at) if self._end is not None else 0
        return penalty_weight(self.rho_schedule, self.rho_start, self.rho, step - self.started_at, total)

    def _update_rho(self, step: int) -> None:
        """The scheduled ``lambda`` from this z/u step on (the solver rescales ``U``)."""
        self.solver.set_rho(self._rho_at(step))

    def _moment_of(self) -> MomentOf | None:
        """Where the optimizer's second moment comes from for the objective-aware projection (None: magnitude)."""
        return None if self.projection == "magnitude" else self._second_moment

    def _second_moment(self, proj: Projection) -> torch.Tensor:
        """``exp_avg_sq`` of the projection's parameter, from whichever optimizer steps it."""
        for optimizer in self._optimizers:
            moment = optimizer.state.get(proj.weight, {}).get("exp_avg_sq")
            if moment is not None:
                return moment
        raise RuntimeError(
            f"ADMM projection='objective' needs the optimizer's second moment (exp_avg_sq) of {proj.param_name}; "
            "use an Adam-type optimizer or projection='magnitude'"
        )

    @torch.no_grad()
    def _finish(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        """Hard-prune to the support of ``Proj(W)`` (:meth:`ADMMSolver.supports` says why ``W``, not ``W + U``)
        and hand masks and report to the callback."""
        clock = time.perf_counter()
        config, adapter = callback.config, self._adapter_for(model, callback.config)
        pattern, self._optimizers = config.parsed_pattern, list(trainer.optimizers)
        if self.started_at is None:  # the run ended before start_step: plain magnitude pruning
            rank_zero_warn(f"ADMM never started (run ended before start_step={self.start_step}); magnitude-pruning")
            self._plan(callback, trainer, model, adapter)
        for proj in adapter.all_projections():  # a diverged run would be "pruned" with NaN scores: say so instead
            if not bool(torch.isfinite(full_fp32(proj.weight)).all()):
                raise ValueError(f"ADMM hard prune: {adapter.module_name(proj)} holds NaN or inf after training (the "
                                 "run diverged; float16 weights under Adam often do): train in bfloat16 or float32")
        keeps = self.solver.supports(adapter, pattern, self._moment_of() if self.started_at is not None else None)
        metrics = self.solver.diagnostics(adapter, keeps)
        masks = commit_masks(adapter, keeps)
        report = self._report(adapter, config, keeps, metrics, time.perf_counter() - clock)
        self.solver.release()  # free the 2x state; masks hold the result from here on
        self.finished = True
        callback.adopt(trainer, model, PruningOutcome(masks=masks, report=report))

    def _report(
        self,
        adapter: ModelAdapter,
        config: PruningConfig,
        keeps: dict[str, torch.Tensor],
        metrics: dict[str, float],
        seconds: float,
    ) -> PruningReport:
        """A report shaped like the engine's, so the CLI, export and heat map work unchanged."""
        report = PruningReport(config=config.to_dict())
        report.projections = [
            projection_report(adapter, p, keeps[p.key], self.counts[p.key], outlier_ratio=self.ratios.get(p.key))
            for p in adapter.all_projections()
        ]
        report.timings = {"admm": self.seconds, "prune": seconds}
        report.calibration = {"batches": 0, "tokens": 0}
        report.metrics.update(metrics)
        report.record_peak_memory("prune")
        return report

    # -- helpers -----------------------------------------------------------------------------------------
    def _adapter_for(self, model: nn.Module, config: PruningConfig) -> ModelAdapter:
        if self._adapter is None or self._adapter.model is not model:
            self._adapter = ModelAdapter(model, targets=config.targets, exclude=config.exclude)
        return self._adapter

    # -- checkpointing -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "z": dict(self.z),
            "u": dict(self.u),
            "counts": dict(self.counts),
            "ratios": dict(self.ratios),
            "started_at": self.started_at,
            "last_projection_step": self.last_projection_step,
            "num_projections": self.num_projections,
            "current_rho": self.current_rho,
            "finished": self.finished,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self._reset()
        self.solver = ADMMSolver(
            state.get("current_rho", self.rho),
            counts=state.get("counts", {}),
            z=state.get("z", {}),
            u=state.get("u", {}),
            num_projections=state.get("num_projections", 0),
        )
        self.ratios = dict(state.get("ratios", {}))
        self.started_at = state.get("started_at")
        self.last_projection_step = state.get("last_projection_step", -1)
        self.finished = state.get("finished", False)
        self.seconds = state.get("seconds", 0.0)


def _deepspeed_grad_scale(trainer: L.Trainer, engine) -> float:
    """Factor that puts the penalty on the scale of DeepSpeed's reduced gradient at the accumulation boundary:
    Lightning divides the loss by the accumulation count and DeepSpeed's 16-bit loss scaler multiplies it (both are
    undone inside DeepSpeed's step), so the penalty must follow both to stay ``lambda (W - Z + U)``."""
    loss_scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
    return loss_scale / trainer.accumulate_grad_batches
