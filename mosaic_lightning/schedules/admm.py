"""Elsa-style ADMM pruning: constrain the real training loss to the sparse set, then hard-prune.

One-shot methods prune against a layer-wise reconstruction proxy. ADMM instead solves
``min f(W) s.t. W in S`` on the training loss ``f`` itself (S: exactly the configured number of weights pruned
per projection, in the configured pattern), by splitting ``W = Z`` (scaled form, ``U`` = running residual):

    x-step  the optimizer's own steps on ``f(W) + rho/2 ||W - Z + U||^2`` (the penalty's gradient
            ``rho (W - Z + U)`` is added to ``W.grad`` after every backward)
    z-step  ``Z = Proj(W + U)`` every ``projection_every`` optimizer steps
    u-step  ``U = U + W - Z``

``Proj`` keeps the largest ``|.|`` under the callback's pattern (per row, per layer or N:M) with the exact
per-projection counts of :func:`~mosaic_lightning.allocation.exact_counts`, which is the Euclidean projection onto
S. At ``end_step`` (or at train end) the weights are hard-pruned to the support of ``Proj(W)`` and the callback
holds the masks from then on, as after a one-shot prune.

Memory: ``Z`` and ``U`` are fp32 copies of every targeted weight on its device, i.e. 8 extra bytes per targeted
weight: twice the targeted weights in fp32, four times in bf16 (Elsa-L quantises this state; not done here).
Runs on one device, DDP and DeepSpeed ZeRO-1/2/3; every rank holds the same whole ``Z``/``U``. Under DeepSpeed
the weights are its fp32 masters and the penalty joins the reduced fp32 gradient in the optimizer's partitions,
once per accumulation boundary; reading either assembles one parameter at a time from all ranks (so each step
moves every targeted weight and gradient over the network once more). FSDP is refused.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..adapters import ModelAdapter, Projection
from ..allocation import Uniform
from ..config import PruningConfig
from ..engine import PruningOutcome, commit_masks, plan_pruning, projection_report
from ..methods import Magnitude
from ..patterns import Pattern
from ..report import PruningReport
from ..trainer_access import causal_lm
from ..zero import add_to_grad_, deepspeed_engine, full_fp32
from .base import PruningHost, Schedule

_UNSUPPORTED_STRATEGIES = (FSDPStrategy, ModelParallelStrategy)


def sparse_projection(x: torch.Tensor, num_prune: int, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean projection of ``x`` (``[out, in]``) onto ``pattern``'s sets with ``num_prune`` zeros.

    The nearest such point keeps the largest ``|x|`` (per row, per layer or per group of M) and zeros the rest.
    Returns ``(projected, keep)``.
    """
    keep = pattern.keep_mask(x.abs(), num_prune)
    return x.masked_fill(~keep, 0), keep


class ADMM(Schedule):
    """ADMM (Elsa) during training, hard-pruned at ``end_step``; see the module docstring for the algorithm.

    The projection is magnitude-based by construction, so the callback's ``method`` is not used; its
    ``sparsity``, ``allocation``, ``pattern``, ``targets`` and ``exclude`` are. Composite (structured) pruning is
    not supported.

    Args:
        rho: penalty weight of ``rho/2 ||W - Z + U||^2`` (Elsa's lambda, 0.01); larger pulls ``W`` to the sparse
            set faster at the cost of the loss.
        projection_every: optimizer steps between z/u updates (Elsa: 32).
        start_step: optimizer step at which ADMM starts (``Z = Proj(W)``, ``U = 0``); before it, plain training.
        end_step: optimizer step after which the model is hard-pruned; None = the run's last step (``max_steps``,
            or train end for epoch-bounded runs). Training after it keeps the pruned weights at zero.
    """

    def __init__(
        self, rho: float = 0.01, projection_every: int = 32, start_step: int = 0, end_step: int | None = None
    ) -> None:
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho={rho!r}; allowed values: a finite number > 0 (Elsa uses 0.01)")
        _check_int("projection_every", projection_every, 1)
        _check_int("start_step", start_step, 0)
        if end_step is not None:
            _check_int("end_step", end_step, start_step + 1, "None or an integer > start_step")
        self.rho, self.projection_every = float(rho), projection_every
        self.start_step, self.end_step = start_step, end_step
        self._reset()
        self._end: int | None = end_step  # end_step resolved against the run in check_run
        self._adapter: ModelAdapter | None = None

    def _reset(self) -> None:
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.ratios: dict[str, float] = {}
        self.started_at: int | None = None  # global step at which Z, U were initialised
        self.last_projection_step = -1  # with gradient accumulation several batches end on one step
        self.num_projections = 0
        self.finished = False
        self.seconds = 0.0  # wall time spent in penalty and projections

    @property
    def active(self) -> bool:
        return self.started_at is not None and not self.finished

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
            rank_zero_warn(f"ADMM projects by magnitude |W + U|; method={config.method!r} is not used")

    def _check_projections(self, adapter: ModelAdapter, config: PruningConfig) -> None:
        """Every target takes the pattern and is trained; a resumed state covers exactly these targets."""
        pattern = config.build_pattern()
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

    def on_after_backward(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        if not self.active:
            return
        engine = deepspeed_engine(trainer)
        if engine is not None and not engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed reduces gradients into its fp32 partitions at the boundary: the penalty joins there
        clock = time.perf_counter()
        self._add_penalty_grad(self._adapter_for(model, callback.config), _grad_scale(trainer, engine))
        self.seconds += time.perf_counter() - clock

    def on_train_batch_end(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        if not self.active:
            return
        step = trainer.global_step
        if step != self.last_projection_step and (step - self.started_at) % self.projection_every == 0:
            self.last_projection_step = step
            clock = time.perf_counter()
            self._z_u_step(self._adapter_for(model, callback.config), callback.config.build_pattern())
            self.seconds += time.perf_counter() - clock
        if self._end is not None and step >= self._end:
            self._finish(callback, trainer, model)

    def on_train_end(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        if not self.finished:
            self._finish(callback, trainer, model)

    # -- the ADMM steps ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _start(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        """``Z = Proj(W)``, ``U = 0``, with the exact counts fixed for the whole run."""
        config = callback.config
        adapter, pattern = self._adapter_for(model, config), config.build_pattern()
        self._plan(callback, trainer, model, adapter)
        for proj in adapter.all_projections():
            self.z[proj.key], _ = sparse_projection(weight_of(proj), self.counts[proj.key], pattern)
            self.u[proj.key] = torch.zeros_like(self.z[proj.key])
        self.started_at = self.last_projection_step = trainer.global_step

    def _plan(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module, adapter: ModelAdapter) -> None:
        """Exact counts from the engine's planner: the callback's allocation, measured on its calibration batches
        (only an allocation that reads data, e.g. OWL or Mosaic, runs a calibration pass)."""
        config = callback.config
        batches = [] if isinstance(config.allocation, Uniform) else callback.calibration_batches(trainer)
        plan = plan_pruning(model, adapter, batches, config, progress=False)
        self.counts, self.ratios = plan.counts, plan.ratios

    @torch.no_grad()
    def _add_penalty_grad(self, adapter: ModelAdapter, scale: float) -> None:
        """``W.grad += rho (W - Z + U)``, in the parameter's own layout (Conv1D keeps ``[in, out]``; GPT-2's fused
        ``c_attn`` gathers its three projections' penalties into one tensor)."""
        for projs in _by_parameter(adapter.all_projections()):
            param = projs[0].weight
            weight = full_fp32(param)
            penalty = torch.zeros_like(weight)
            for proj in projs:
                z, u = self._state_of(proj)
                proj.view_of(penalty).copy_(proj.view_of(weight) - z).add_(u)
            add_to_grad_(param, penalty.mul_(self.rho * scale))

    @torch.no_grad()
    def _z_u_step(self, adapter: ModelAdapter, pattern: Pattern) -> None:
        """``Z = Proj(W + U)``, ``U = U + W - Z``; new tensors, so a checkpoint being written keeps its copy."""
        for proj in adapter.all_projections():
            z, u = self._state_of(proj)
            w = weight_of(proj)
            z, _ = sparse_projection(w + u, self.counts[proj.key], pattern)
            self.z[proj.key], self.u[proj.key] = z, (w - z).add_(u)
        self.num_projections += 1

    @torch.no_grad()
    def _finish(self, callback: PruningHost, trainer: L.Trainer, model: nn.Module) -> None:
        """Hard-prune to the support of ``Proj(W)`` and hand masks and report to the callback.

        ``Proj(W)`` rather than ``Proj(W + U)``: it is the feasible point nearest to the weights the loss was
        trained at, so the hard prune perturbs the trained model least; near convergence (``W ~ Z``) the two
        supports agree, and before it ``U`` (an accumulated residual, not a weight) would keep entries that are
        small in ``W``. The agreement is reported as ``admm_support_agreement``.
        """
        clock = time.perf_counter()
        config, adapter = callback.config, self._adapter_for(model, callback.config)
        pattern = config.build_pattern()
        if self.started_at is None:  # the run ended before start_step: plain magnitude pruning
            rank_zero_warn(f"ADMM never started (run ended before start_step={self.start_step}); magnitude-pruning")
            self._plan(callback, trainer, model, adapter)
        projs = adapter.all_projections()
        keeps = {p.key: sparse_projection(weight_of(p), self.counts[p.key], pattern)[1] for p in projs}
        metrics = self._diagnostics(adapter, keeps)
        masks = commit_masks(adapter, keeps)
        report = self._report(adapter, config, keeps, metrics, time.perf_counter() - clock)
        self.z, self.u, self.finished = {}, {}, True  # free the 2x state; masks hold the result from here on
        callback.adopt(trainer, model, PruningOutcome(masks=masks, report=report))

    def _diagnostics(self, adapter: ModelAdapter, keeps: dict[str, torch.Tensor]) -> dict[str, float]:
        """Primal residual ``||W - Z|| / ||W||`` and the share of kept weights also kept by ``Z``."""
        if not self.z:
            return {"admm_z_steps": 0}
        gap = norm = agree = kept = 0.0
        for proj in adapter.all_projections():
            z, _ = self._state_of(proj)
            w = weight_of(proj)
            gap += float((w - z).square().sum())
            norm += float(w.square().sum())
            agree += int((keeps[proj.key] & (z != 0)).sum())
            kept += int(keeps[proj.key].sum())
        return {
            "admm_z_steps": self.num_projections,
            "admm_primal_residual": math.sqrt(gap / max(norm, 1e-30)),
            "admm_support_agreement": agree / max(kept, 1),
        }

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

    def _state_of(self, proj: Projection) -> tuple[torch.Tensor, torch.Tensor]:
        """``Z``, ``U`` of a projection on its weight's device (a checkpoint may load them elsewhere)."""
        z, u = self.z[proj.key], self.u[proj.key]
        if z.device != proj.weight.device:
            z, u = z.to(proj.weight.device), u.to(proj.weight.device)
            self.z[proj.key], self.u[proj.key] = z, u
        return z, u

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
            "finished": self.finished,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self._reset()
        self.z, self.u = dict(state.get("z", {})), dict(state.get("u", {}))
        self.counts, self.ratios = dict(state.get("counts", {})), dict(state.get("ratios", {}))
        self.started_at = state.get("started_at")
        self.last_projection_step = state.get("last_projection_step", -1)
        self.num_projections = state.get("num_projections", 0)
        self.finished = state.get("finished", False)
        self.seconds = state.get("seconds", 0.0)


def _check_int(name: str, value, minimum: int, allowed: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}; allowed values: {allowed or f'an integer >= {minimum}'}")


def _grad_scale(trainer: L.Trainer, engine=None) -> float:
    """Factor that puts the penalty on the gradients' scale: Lightning divides the loss by the accumulation
    count and a 16-bit loss scaler (torch's GradScaler, or DeepSpeed's inside its optimizer) multiplies it; the
    penalty must follow both to stay ``rho (W - Z + U)``."""
    if engine is not None:
        loss_scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
    else:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0
    return loss_scale / trainer.accumulate_grad_batches


def weight_of(proj: Projection) -> torch.Tensor:
    """The projection's whole ``[out, in]`` weight in fp32 as the optimizer steps it (DeepSpeed: the fp32
    master, assembled from all ranks, so every rank calls this for the same projections in the same order)."""
    return proj.view_of(full_fp32(proj.weight))


def _by_parameter(projs: list[Projection]) -> list[list[Projection]]:
    """Projections grouped by the parameter holding them (a fused module's parts are adjacent)."""
    groups: dict[str, list[Projection]] = {}
    for proj in projs:
        groups.setdefault(proj.param_name, []).append(proj)
    return list(groups.values())
