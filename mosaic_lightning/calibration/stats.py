"""Calibration statistics a projection's inputs produce: column norms (Wanda) and the Hessian (SparseGPT).

Kept as plain sums so that statistics from several batches, or several ranks, combine by addition.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


class NonFiniteActivationError(ValueError):
    """Calibration activations contain NaN or inf: pruning from them would be meaningless."""


@dataclass(frozen=True)
class Contribution:
    """One batch's share of the sums."""

    sq_sum: torch.Tensor
    xxt: torch.Tensor | None
    tokens: int


class InputStatistics:
    """Running sums over every token that entered one module: ``sum x_j^2`` and optionally ``sum x x^T``."""

    def __init__(self, name: str, in_features: int, hessian: bool, device: torch.device | str = "cpu") -> None:
        self.name = name
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def update(self, x: torch.Tensor) -> None:
        self.add(self.contribution(x))
        check_finite([self])

    def contribution(self, x: torch.Tensor) -> Contribution:
        """What ``x`` adds to the sums; modules fed the same tensor (q/k/v, gate/up) share one computation.
        Not checked for NaN/inf here (that would be a host sync per batch): whoever accumulates calls
        :func:`check_finite` once the pass is over."""
        x = x.detach().reshape(-1, x.shape[-1])
        x64 = x.to(self.sq_sum.dtype, copy=True)  # always a new tensor (also for fp64 models): square it in place
        column_sq_sum = x64.mul_(x64).sum(dim=0)  # no second activation-sized fp64 buffer
        xxt = None
        if self.xxt is not None:
            x32 = x.float()
            xxt = x32.t() @ x32
        return Contribution(column_sq_sum, xxt, x.shape[0])

    def add(self, part: Contribution) -> None:
        self.sq_sum += part.sq_sum
        if self.xxt is not None:
            self.xxt += part.xxt
        self.tokens += part.tokens

    @property
    def column_norms(self) -> torch.Tensor:
        """``||X_j||_2`` over all calibration tokens, float32."""
        return self.sq_sum.sqrt().float()

    @property
    def hessian(self) -> torch.Tensor:
        """``X X^T / tokens`` (the scale does not change SparseGPT's choices; damping is relative)."""
        if self.xxt is None:
            raise RuntimeError(f"{self.name}: Hessian was not collected")
        return self.xxt / max(self.tokens, 1)

    def select(self, columns: torch.Tensor) -> InputStatistics:
        """Statistics of a subset of input columns (the ones structured pruning keeps)."""
        sub = InputStatistics(self.name, int(columns.numel()), hessian=False, device=self.sq_sum.device)
        sub.tokens = self.tokens
        sub.sq_sum = self.sq_sum[columns]
        if self.xxt is not None:
            sub.xxt = self.xxt[columns][:, columns]
        return sub

    def all_reduce(self) -> None:
        """Sum statistics over all ranks so every rank derives the same masks from everyone's batches."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        dist.all_reduce(self.sq_sum)
        if self.xxt is not None:
            dist.all_reduce(self.xxt)
        self.tokens = sum_over_ranks(self.tokens)


def check_finite(entries: Iterable[InputStatistics]) -> None:
    """Raise :class:`NonFiniteActivationError` naming the first module whose inputs held NaN or inf, with one host
    sync for all ``entries`` (a pass's statistics, on one device).

    A NaN or inf anywhere in an input makes its column's fp64 sum of squares NaN or inf (finite fp32/bf16/fp16
    values cannot overflow it), and sums of non-negative terms cannot cancel, so the total of every ``sq_sum``
    is finite exactly when every input was."""
    entries = list(entries)
    if not entries:
        return
    total = torch.stack([e.sq_sum.sum() for e in entries]).sum()
    if bool(torch.isfinite(total)):
        return
    bad = next(e for e in entries if not bool(torch.isfinite(e.sq_sum).all()))
    raise NonFiniteActivationError(
        f"calibration activations entering {bad.name} contain NaN or inf; no weight was changed. "
        "Check the calibration data and the model dtype (fp16 overflow is a common cause)."
    )


def sum_over_ranks(value: int) -> int:
    """An integer summed over all ranks (itself outside torch.distributed); a collective: every rank calls."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    nccl = dist.get_backend() == "nccl"  # NCCL reduces GPU tensors only, gloo CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total.item())
