"""SparseGPT (Frantar & Alistarh, 2023): OBS-style pruning that updates the kept weights to cancel the error.

Columns are walked in blocks; in each block the mask is chosen by ``w^2 / [H^-1]_jj^2`` (lazily per group of
M columns for N:M, as in the reference implementation), and each pruned column's error is spread over the
columns not yet visited through the inverse-Hessian's Cholesky factor. Where a block's mask is chosen before its
walk (every unstructured pattern), the walk is computed as one triangular solve per row (batched), not column by
column in Python: the same result up to float rounding, and faster (``_solve_fixed_block``; see
bench/RESULTS.md, section 'Against one forward pass').

Mask selection for unstructured patterns (``mask_scope``):

- ``"row"`` (default): within each column block, every output row loses its share of the block's count, under
  the configured pattern (per-row, as Wanda compares): each row ends with the same sparsity.
- ``"block"``: within each column block, the lowest scores over *all rows* go, as the reference code does
  (``thresh = sort(tmp.flatten())[int(tmp.numel() * sparsity)]``). Rows then differ in sparsity.

Deliberate difference from the reference in both: each block prunes an exact integer share of the projection's
planned count (split in proportion to block widths), not ``int(numel * sparsity)`` plus threshold ties, so the
achieved sparsity equals the plan to the weight.
"""

from __future__ import annotations

import torch

from ..calibration.block import ProjectionStatistics
from ..core.patterns import NM, Pattern, Unstructured
from .base import PruneResult, PruningMethod
from .wanda import wanda_scores

MASK_SCOPES = ("row", "block")


def split_exact(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` that sum exactly to ``total``."""
    whole = sum(weights)
    raw = [total * w / whole for w in weights]
    parts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + damp*mean(diag H)*I)^-1``, and the mask of dead (never active) inputs."""
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True), dead


def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, num_prune: int, blocksize: int, damp: float
) -> PruneResult:
    w = weight.detach().clone().float()
    h_inv, dead = inverse_hessian_cholesky(hessian, damp)
    w[:, dead] = 0
    keep = torch.ones_like(w, dtype=torch.bool)
    starts = list(range(0, w.shape[1], blocksize))
    widths = [min(blocksize, w.shape[1] - s) for s in starts]
    block_prunes = split_exact(num_prune, widths) if not isinstance(pattern, NM) else None
    for b, (i1, width) in enumerate(zip(starts, widths, strict=True)):
        i2 = i1 + width
        h1 = h_inv[i1:i2, i1:i2]
        if block_prunes is None:  # N:M: each group's mask is chosen when the walk reaches it
            q1, err1 = _walk_nm_block(w[:, i1:i2].clone(), h1, pattern, keep[:, i1:i2])
        else:
            keep[:, i1:i2] = pattern.keep_mask(w[:, i1:i2] ** 2 / torch.diag(h1)[None, :] ** 2, block_prunes[b])
            q1, err1 = _solve_fixed_block(w[:, i1:i2], keep[:, i1:i2], h1)
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return PruneResult(keep=keep, weight=w.to(weight.dtype))


def _walk_nm_block(w1: torch.Tensor, h1: torch.Tensor, pattern: NM, keep: torch.Tensor):
    """The reference's column walk over one block, choosing each group of M columns' mask on arrival (written
    into ``keep``, a view); the block's pruned weights and the error of each column."""
    q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
    d = torch.diag(h1)
    for i in range(w1.shape[1]):
        if i % pattern.m == 0:
            group = slice(i, i + pattern.m)
            keep[:, group] = pattern.keep_mask(w1[:, group] ** 2 / d[None, group] ** 2,
                                               w1.shape[0] * (pattern.m - pattern.n))  # fmt: skip
        col = w1[:, i]
        q1[:, i] = torch.where(keep[:, i], col, torch.zeros_like(col))
        e = (col - q1[:, i]) / h1[i, i]
        w1[:, i:] -= e[:, None] @ h1[i, i:][None, :]
        err1[:, i] = e
    return q1, err1


def _solve_fixed_block(w1: torch.Tensor, keep: torch.Tensor, h1: torch.Tensor, width: int = 32):
    """The column walk over one block whose mask is known, without a Python step per column.

    The walk sets ``e_i = p_i (w_i - sum_{j<i} e_j U_ji) / U_ii`` (``p`` = pruned, ``U`` = the block's upper
    Cholesky factor, ``w`` the weights as the block began). Taken ``width`` columns at a time (the error of each
    slice is spread over the columns after it by one matmul, as the blocks themselves are), each slice is a
    triangular solve per row: ``e`` solves the lower-triangular system whose row ``i`` is ``U[:, i]^T`` where
    ``i`` is pruned and the unit row where it is kept (there ``e_i = 0``), right-hand side ``p w``. The same
    arithmetic as the walk up to rounding order; the kept weights end as the walk leaves them,
    ``w_i - sum_{j<i} e_j U_ji``. Narrow slices keep the per-row systems (rows x width^2 values) small."""
    w1 = w1.clone()
    q1, err1 = torch.zeros_like(w1), torch.empty_like(w1)
    for c1 in range(0, w1.shape[1], width):
        cols = slice(c1, c1 + width)
        err1[:, cols] = _solve_rows(w1[:, cols], keep[:, cols], h1[cols, cols])
        q1[:, cols] = torch.where(keep[:, cols], w1[:, cols] - err1[:, cols] @ torch.triu(h1[cols, cols], 1), 0.0)
        w1[:, c1 + width :] -= err1[:, cols] @ h1[cols, c1 + width :]
    return q1, err1


def _solve_rows(w: torch.Tensor, keep: torch.Tensor, u: torch.Tensor, rows_per_solve: int = 256) -> torch.Tensor:
    """Per row, ``e`` with ``e_i = p_i (w_i - sum_{j<i} e_j u_ji) / u_ii`` (see ``_solve_fixed_block``)."""
    lower, eye = u.t(), torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
    err = torch.empty_like(w)
    for r in range(0, w.shape[0], rows_per_solve):
        pruned = ~keep[r : r + rows_per_solve]
        system = torch.where(pruned[:, :, None], lower[None], eye[None])
        rhs = (w[r : r + rows_per_solve] * pruned)[:, :, None]
        err[r : r + rows_per_solve] = torch.linalg.solve_triangular(system, rhs, upper=False)[..., 0]
    return err


class SparseGPT(PruningMethod):
    name = "sparsegpt"
    needs_hessian = True

    """SparseGPT; see the module docstring.

    Args:
        blocksize: columns per lazy-update block (reference: 128).
        damp: Hessian damping relative to its mean diagonal (reference: 0.01).
        mask_scope: ``"row"`` (each row pruned equally, default) or ``"block"`` (lowest scores over all rows of
            each column block, as the reference code). N:M patterns choose per group of M either way.
    """

    def __init__(self, blocksize: int = 128, damp: float = 0.01, mask_scope: str = "row") -> None:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"sparsegpt blocksize={blocksize!r}; must be a positive integer")
        if not 0 < damp < 1:
            raise ValueError(f"sparsegpt damp={damp}; allowed values: 0 < damp < 1")
        if mask_scope not in MASK_SCOPES:
            raise ValueError(f"sparsegpt mask_scope={mask_scope!r}; allowed values: {list(MASK_SCOPES)}")
        self.blocksize, self.damp, self.mask_scope = blocksize, damp, mask_scope

    def scores(self, weight: torch.Tensor, stats: ProjectionStatistics) -> torch.Tensor:
        # Unit scores of composite pruning use Wanda scores, as OWL-SparseGPT does for its profile.
        return wanda_scores(weight, stats.column_norms)

    def prune(self, weight: torch.Tensor, stats: ProjectionStatistics, pattern: Pattern, num_prune: int) -> PruneResult:
        if isinstance(pattern, NM) and self.blocksize % pattern.m:
            raise ValueError(f"sparsegpt blocksize={self.blocksize} must be a multiple of M={pattern.m}")
        if self.mask_scope == "block" and isinstance(pattern, Unstructured):
            pattern = Unstructured("layer")  # applied to each column block: all its rows compete
        return sparsegpt_prune(weight, stats.hessian, pattern, num_prune, self.blocksize, self.damp)
