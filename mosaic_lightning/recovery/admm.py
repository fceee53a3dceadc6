"""The ADMM solver for ``min f(W) s.t. W in S``: what each step computes, free of Lightning.

``f`` is the training loss, ``S`` the weights with exactly the planned number pruned per projection in the
configured pattern. ADMM splits ``W = Z`` and runs, in scaled form with ``U`` the scaled dual (Boyd et al.,
*Distributed Optimization and Statistical Learning via ADMM*, 2011, section 3.1.1)::

    x-step  W <- argmin f(W) + lambda/2 ||W - Z + U||^2   (the training loop's optimizer; here: the gradient
                                                             lambda (W - Z + U) it adds to the loss gradient)
    z-step  Z <- Proj_S(W + U)
    u-step  U <- U + W - Z
    lambda  U <- U * lambda_old / lambda_new on a change of the penalty weight, so the unscaled dual lambda U
            is unchanged

``Proj_S`` keeps the largest scores under the pattern with the exact counts: ``|x|`` makes it the Euclidean
projection (the nearest point of ``S``), ``v x^2`` (``v`` the optimizer's second moment) the objective-aware
projection of Elsa. The hard prune at the end keeps the support of ``Proj_S(W)``.

Why apart from :class:`~mosaic_lightning.schedules.ADMM`: the schedule decides *when* each step runs (Lightning
hooks, the optimizer-step wrapper, gradient accumulation, checkpoints); this module decides *what* it computes, so
each formula is tested against an independent computation without a trainer (``tests/test_admm_solver.py``).

Two levels: pure functions on one ``[out, in]`` tensor (the formulas), and :class:`ADMMSolver`, which holds
``Z``, ``U``, the counts and ``lambda`` for every targeted projection of a model and applies the formulas in the
parameters' own layouts (GPT-2's transposed, fused ``c_attn``) and on DeepSpeed's fp32 masters (assembled one
parameter at a time, so every rank must call it for the same projections in the same order).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..core.adapters import ModelAdapter, Projection
from ..core.patterns import Pattern
from ..core.zero import add_to_grad_, full_fp32

RHO_SCHEDULES = ("constant", "linear", "cosine", "exponential")

MomentOf = Callable[[Projection], torch.Tensor]
"""The optimizer's second moment of a projection's parameter, in the parameter's layout (objective scores)."""


# -- the formulas, on one [out, in] tensor --------------------------------------------------------------------
def sparse_projection(
    x: torch.Tensor, num_prune: int, pattern: Pattern, scores: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection of ``x`` (``[out, in]``) onto ``pattern``'s sets with ``num_prune`` zeros.

    Keeps the largest ``scores`` (default ``|x|``, which makes it the Euclidean projection: the nearest such point)
    per row, per layer or per group of M and zeros the rest. Returns ``(projected, keep)``.
    """
    keep = pattern.keep_mask(x.abs() if scores is None else scores, num_prune)
    return x.masked_fill(~keep, 0), keep


def objective_scores(x: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """Elsa's objective-aware score ``v x^2``: a diagonal estimate of the loss increase from zeroing ``x``, with
    ``v`` the optimizer's second moment (Adam's ``exp_avg_sq``, not bias-corrected, as the reference)."""
    return second_moment.float() * x.square()


def penalty_gradient(w: torch.Tensor, z: torch.Tensor, u: torch.Tensor, rho: float) -> torch.Tensor:
    """``rho (W - Z + U)``: the gradient of the penalty ``rho/2 ||W - Z + U||^2`` in ``W`` (a new tensor)."""
    return (w - z).add_(u).mul_(rho)


def z_u_update(
    w: torch.Tensor,
    u: torch.Tensor,
    num_prune: int,
    pattern: Pattern,
    second_moment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One z-step and u-step: ``Z = Proj(W + U)``, ``U = U + W - Z``. Returns new ``(Z, U)`` tensors (a
    checkpoint being written keeps its copies); scores ``|W + U|``, or ``v (W + U)^2`` given ``second_moment``."""
    x = w + u
    scores = None if second_moment is None else objective_scores(x, second_moment)
    z, _ = sparse_projection(x, num_prune, pattern, scores)
    return z, (w - z).add_(u)


def rescale_dual(u: torch.Tensor, rho_old: float, rho_new: float) -> torch.Tensor:
    """``U`` for a new penalty weight: ``U lambda_old / lambda_new`` keeps the unscaled dual ``lambda U``."""
    return u * (rho_old / rho_new)


def penalty_weight(schedule: str, start: float, final: float, step: int, total: int) -> float:
    """The penalty weight ``lambda`` at ``step`` of ``total`` ADMM steps, as Elsa's schedules: constant ``final``,
    or from ``start`` to ``final`` linearly, along a half cosine, or geometrically (a zero ``start`` is taken as
    1e-12 there, as the reference does)."""
    if schedule == "constant" or total <= 0:
        return final
    frac = min(max(step / total, 0.0), 1.0)
    if schedule == "linear":
        return start + (final - start) * frac
    if schedule == "cosine":
        return start + (final - start) * 0.5 * (1 - math.cos(math.pi * frac))
    origin = start if start > 0 else 1e-12
    return origin * (final / origin) ** frac


# -- the state over a model's projections ---------------------------------------------------------------------
class ADMMSolver:
    """``Z``, ``U`` (fp32, by projection key), the exact prune counts and the current ``lambda`` of one run.

    Memory: ``Z`` and ``U`` are fp32 copies of every targeted weight on its device, 8 extra bytes per targeted
    weight. Every rank holds the same whole ``Z``/``U``.

    Args:
        rho: the current penalty weight ``lambda``.
        counts: weights to prune per projection key (fixed for the run: they define ``S``).
        z, u: restored state (a checkpoint's), by projection key.
        num_projections: z/u steps done so far.
    """

    def __init__(
        self,
        rho: float,
        counts: dict[str, int] | None = None,
        z: dict[str, torch.Tensor] | None = None,
        u: dict[str, torch.Tensor] | None = None,
        num_projections: int = 0,
    ) -> None:
        self.rho = rho
        self.counts: dict[str, int] = dict(counts or {})
        self.z: dict[str, torch.Tensor] = dict(z or {})
        self.u: dict[str, torch.Tensor] = dict(u or {})
        self.num_projections = num_projections

    @torch.no_grad()
    def start(self, adapter: ModelAdapter, pattern: Pattern, rho: float) -> None:
        """``Z = Proj(W)`` by magnitude (no second moment exists yet), ``U = 0``, penalty weight ``rho``."""
        for proj in adapter.all_projections():
            self.z[proj.key], _ = sparse_projection(weight_of(proj), self.counts[proj.key], pattern)
            self.u[proj.key] = torch.zeros_like(self.z[proj.key])
        self.rho = rho

    @torch.no_grad()
    def add_penalty_grad(self, adapter: ModelAdapter, scale: float = 1.0) -> None:
        """``W.grad += lambda (W - Z + U)``, in the parameter's own layout (Conv1D keeps ``[in, out]``; GPT-2's
        fused ``c_attn`` gathers its three projections' penalties into one tensor). ``scale`` puts it on the
        gradient's scale where that is not the loss's own (DeepSpeed's loss scaling)."""
        for projs in _by_parameter(adapter.all_projections()):
            param = projs[0].weight
            weight = full_fp32(param)
            penalty = torch.zeros_like(weight)
            for proj in projs:
                z, u = self._state_of(proj)
                proj.view_of(penalty).copy_(penalty_gradient(proj.view_of(weight), z, u, self.rho * scale))
            add_to_grad_(param, penalty)

    @torch.no_grad()
    def z_u_step(self, adapter: ModelAdapter, pattern: Pattern, moment_of: MomentOf | None = None) -> None:
        """:func:`z_u_update` on every projection (objective scores where ``moment_of`` is given)."""
        for proj in adapter.all_projections():
            _, u = self._state_of(proj)
            moment = None if moment_of is None else proj.view_of(moment_of(proj))
            self.z[proj.key], self.u[proj.key] = z_u_update(weight_of(proj), u, self.counts[proj.key], pattern, moment)
        self.num_projections += 1

    def set_rho(self, rho: float) -> None:
        """The penalty weight from now on, ``U`` rescaled by :func:`rescale_dual`."""
        if rho != self.rho:
            self.u = {key: rescale_dual(u, self.rho, rho) for key, u in self.u.items()}
            self.rho = rho

    @torch.no_grad()
    def supports(
        self, adapter: ModelAdapter, pattern: Pattern, moment_of: MomentOf | None = None
    ) -> dict[str, torch.Tensor]:
        """The keep masks of ``Proj(W)`` by projection key: where the hard prune leaves the weights.

        ``Proj(W)`` rather than ``Proj(W + U)``: it is the feasible point nearest to the weights the loss was
        trained at, so the hard prune perturbs the trained model least; near convergence (``W ~ Z``) the two
        supports agree, and before it ``U`` (an accumulated residual, not a weight) would keep entries that are
        small in ``W``. The agreement is what :meth:`diagnostics` reports.
        """
        keeps = {}
        for proj in adapter.all_projections():
            w = weight_of(proj)
            scores = None if moment_of is None else objective_scores(w, proj.view_of(moment_of(proj)))
            keeps[proj.key] = sparse_projection(w, self.counts[proj.key], pattern, scores)[1]
        return keeps

    @torch.no_grad()
    def diagnostics(self, adapter: ModelAdapter, keeps: dict[str, torch.Tensor]) -> dict[str, float]:
        """z/u steps done, the primal residual ``||W - Z|| / ||W||`` over all projections and the share of the
        kept weights (``keeps``) that ``Z`` also keeps. Only the step count when ``Z`` was never formed."""
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

    def release(self) -> None:
        """Free ``Z`` and ``U`` (twice the targeted weights in fp32) once the masks hold the result."""
        self.z, self.u = {}, {}

    def _state_of(self, proj: Projection) -> tuple[torch.Tensor, torch.Tensor]:
        """``Z``, ``U`` of a projection on its weight's device (a checkpoint may load them elsewhere)."""
        z, u = self.z[proj.key], self.u[proj.key]
        if z.device != proj.weight.device:
            z, u = z.to(proj.weight.device), u.to(proj.weight.device)
            self.z[proj.key], self.u[proj.key] = z, u
        return z, u


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
