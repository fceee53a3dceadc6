"""Sparsity patterns: *what shape* the pruned set takes, given scores (lower = prune first).

Each pattern turns a score matrix ``[out, in]`` and an exact number of weights to prune into a keep mask.
Working in exact counts, not fractions, is what lets the achieved sparsity equal the requested one.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

import torch


class Pattern(ABC):
    """Chooses which weights to prune from a score matrix."""

    name: str

    @property
    def fixed_sparsity(self) -> float | None:
        """Sparsity the pattern imposes (N:M), or None when any sparsity is possible."""
        return None

    def check_shape(self, in_features: int, where: str) -> None:  # noqa: B027 - most patterns take any shape
        """Raise a clear error when a projection's shape cannot take this pattern."""

    def quantum(self, out_features: int, in_features: int) -> int:
        """Prune counts of an ``[out, in]`` projection must be multiples of this (1: any count)."""
        return 1

    def for_count(self, out_features: int, in_features: int, num_prune: int) -> Pattern:
        """The pattern that prunes ``num_prune`` weights of such a projection (itself, except for mixed N:M)."""
        return self

    @abstractmethod
    def keep_mask(self, scores: torch.Tensor, num_prune: int) -> torch.Tensor:
        """Bool mask, True = keep, with exactly ``num_prune`` False entries."""


class Unstructured(Pattern):
    """Prune the lowest scores, compared within each output row (as Wanda does) or over the whole layer."""

    def __init__(self, scope: str = "row") -> None:
        if scope not in ("row", "layer"):
            raise ValueError(f"unstructured scope={scope!r}; allowed values: 'row', 'layer'")
        self.scope = scope
        self.name = "unstructured" if scope == "row" else "unstructured-layer"

    def keep_mask(self, scores: torch.Tensor, num_prune: int) -> torch.Tensor:
        if not 0 <= num_prune <= scores.numel():
            raise ValueError(f"num_prune={num_prune} outside [0, {scores.numel()}]")
        keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)  # contiguous, even for views
        if num_prune == 0:
            return keep
        if self.scope == "layer":
            idx = torch.topk(scores.flatten(), num_prune, largest=False).indices
            keep.view(-1)[idx] = False
            return keep
        return _row_keep_mask(scores, num_prune)


def _row_keep_mask(scores: torch.Tensor, num_prune: int) -> torch.Tensor:
    """Prune ``num_prune // rows`` per row; the remainder goes to the rows whose next candidate scores lowest.

    Per row this prunes what a stable sort would put first: every score below the row's k-th smallest, then the
    k-th smallest's ties in index order. ``kthvalue`` finds that threshold in linear time (a full sort of every
    row is slower: ``n log n`` per row)."""
    rows, cols = scores.shape
    per_row, extra = divmod(num_prune, rows)
    counts = torch.full((rows, 1), per_row, dtype=torch.long, device=scores.device)
    threshold = _kth_smallest(scores, per_row)
    if extra:
        next_candidate = _kth_smallest(scores, per_row + 1)
        lowest = torch.topk(next_candidate.squeeze(1), extra, largest=False).indices
        counts[lowest] += 1
        threshold[lowest] = next_candidate[lowest]
    below = scores < threshold
    ties = scores == threshold
    ties_to_prune = (counts - below.sum(1, keepdim=True)).clamp_(min=0)
    prune = below | (ties & (ties.cumsum(1) <= ties_to_prune))
    return ~prune


def _kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k-th smallest score as ``[rows, 1]``; for k = 0 the smallest, which nothing lies below."""
    return torch.kthvalue(scores, max(k, 1), dim=1, keepdim=True).values


class NM(Pattern):
    """Keep ``n`` of every ``m`` consecutive input weights of a row (2:4 runs on sparse tensor cores)."""

    def __init__(self, n: int, m: int) -> None:
        if not (0 < n < m):
            raise ValueError(f"N:M pattern {n}:{m} needs 0 < N < M")
        self.n, self.m = n, m
        self.name = f"{n}:{m}"

    @property
    def fixed_sparsity(self) -> float:
        return 1 - self.n / self.m

    def check_shape(self, in_features: int, where: str) -> None:
        if in_features % self.m:
            raise ValueError(
                f"pattern={self.name!r}: M={self.m} does not divide the input width {in_features} of {where}; "
                f"choose M from the divisors of {in_features} (e.g. 2:4 or 4:8 where they divide)"
            )

    def keep_mask(self, scores: torch.Tensor, num_prune: int) -> torch.Tensor:
        rows, cols = scores.shape
        self.check_shape(cols, "this score matrix")
        expected = rows * cols // self.m * (self.m - self.n)
        if num_prune != expected:
            raise ValueError(f"{self.name} prunes exactly {expected} of {rows}x{cols}, not {num_prune}")
        groups = scores.reshape(rows, cols // self.m, self.m)
        idx = torch.topk(groups, self.m - self.n, dim=-1, largest=False).indices
        keep = torch.ones(groups.shape, dtype=torch.bool, device=groups.device)
        keep.scatter_(-1, idx, False)
        return keep.reshape(rows, cols)


class MixedNM(Pattern):
    """N:M with M fixed and N chosen per projection by the allocation (``"mixed:8"``): a projection pruned by
    ``k`` weights of every ``M`` keeps ``N = M - k``, ``1 <= N < M``. Its counts come in steps of
    ``out * in / M`` (one N per projection), which the planner keeps while making the total exact."""

    def __init__(self, m: int) -> None:
        if m < 2:
            raise ValueError(f"mixed N:M pattern mixed:{m} needs M >= 2")
        self.m = m
        self.name = f"mixed:{m}"

    def check_shape(self, in_features: int, where: str) -> None:
        NM(1, self.m).check_shape(in_features, where)

    def quantum(self, out_features: int, in_features: int) -> int:
        return out_features * in_features // self.m

    def for_count(self, out_features: int, in_features: int, num_prune: int) -> NM:
        step = self.quantum(out_features, in_features)
        if num_prune % step or not 0 < num_prune // step < self.m:
            raise ValueError(
                f"{self.name}: {num_prune} of {out_features}x{in_features} is not k/{self.m} of it with "
                f"0 < k < {self.m}"
            )
        return NM(self.m - num_prune // step, self.m)

    def keep_mask(self, scores: torch.Tensor, num_prune: int) -> torch.Tensor:
        return self.for_count(*scores.shape, num_prune).keep_mask(scores, num_prune)


def parse_pattern(spec: str) -> Pattern:
    """``"unstructured"`` (per row), ``"unstructured-layer"``, ``"N:M"`` such as ``"2:4"``, or ``"mixed:M"``."""
    if spec == "unstructured":
        return Unstructured("row")
    if spec == "unstructured-layer":
        return Unstructured("layer")
    match = re.fullmatch(r"(\d+):(\d+)", spec)
    if match:
        return NM(int(match.group(1)), int(match.group(2)))
    match = re.fullmatch(r"mixed:(\d+)", spec)
    if match:
        return MixedNM(int(match.group(1)))
    raise ValueError(
        f"pattern={spec!r}; allowed values: 'unstructured', 'unstructured-layer', 'N:M' (e.g. '2:4'), 'mixed:M' "
        "(N:M with N chosen per projection by the allocation, e.g. 'mixed:8')"
    )
