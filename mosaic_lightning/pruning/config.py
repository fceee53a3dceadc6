"""Pruning configuration, validated as a whole before any weight is touched."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..allocation import Allocation, Uniform, resolve_allocation
from ..core.adapters import check_pattern
from ..core.components import Component
from ..core.patterns import NM, MixedNM, Pattern, parse_pattern
from ..core.structure import UNIT_KINDS
from ..methods import PruningMethod, resolve_method


@dataclass
class PruningConfig:
    """What to prune and how. Every field is checked in ``__post_init__`` with an error naming it.

    The engine-level defaults are the plain baseline (Wanda, uniform); :class:`~mosaic_lightning.MosaicPruning`
    and the ``mosaic-*`` recipes default to the published Mosaic system (SparseGPT, ``mosaic`` allocation).

    Args:
        sparsity: fraction of the targeted projections' weights to prune, parameter-weighted, in [0, 1).
        method: which weights go: a shorthand (``magnitude``, ``wanda``, ``sparsegpt``, ``random``), a
            :class:`~mosaic_lightning.methods.PruningMethod` instance, or ``{"class_path", "init_args"}``.
            Method options are its own ``init_args`` (e.g. SparseGPT's ``blocksize``, ``damp``, ``mask_scope``).
        allocation: how much each projection is pruned: ``uniform``, ``owl`` (per layer), ``mosaic`` (the
            published Mosaic: OWL's layer profile plus a per-projection-type offset), an
            :class:`~mosaic_lightning.allocation.Allocation` instance or ``{"class_path", "init_args"}``
            (outlier ``threshold`` and ``lam`` are OWL's and Mosaic's own arguments).
        pattern: ``unstructured`` (compared per output row), ``unstructured-layer``, ``N:M`` (e.g. ``2:4``) or
            ``mixed:M`` (N:M with each projection's N from the allocation, e.g. ``mixed:8`` with ``msp``; counts in
            whole steps of 1/M, the total still exact).
        targets: projections to prune, by short name (q,k,v,o,gate,up,down) or module-name regex; None = all.
        exclude: projections to leave dense, same syntax.
        min_sparsity, max_sparsity: bounds on any one projection's sparsity under non-uniform allocation.
        structured_fraction: share of the pruned weights removed as whole units (composite pruning), in
            [0, 1]; 0 = unstructured only, 1 = structured only. Robust (few-outlier) units take more of it.
        structured_units: unit kinds to remove: ``mlp`` (channels) and/or ``heads`` (attention heads).
        structure_lambda: spread of the per-layer unit removal (OWL's rule on unit groups): removed fractions
            span ``2 * structure_lambda`` around their mean.
        uniform_structure: remove the same number of units in every layer, so that a plain HF config
            describes the compacted model; otherwise per-layer sizes (load with ``load_pruned``). Only head counts
            the family's config can state are kept (for Gemma-3 with hidden size 640 and 4 heads: 4, 2 or 1, not
            3); where none smaller can be stated (OPT, GPT-2), MLP channels take the whole structured share.
        whole_units: remove whole units only, no single weights (needs ``structured_fraction=1``): the removal is
            rounded up to whole units, so at least ``sparsity`` of the projections' weights goes and the model
            compacts to a plain smaller one with no zeros left to hold.
        target_params: a size target instead of ``sparsity`` (needs ``whole_units``): the model's parameter
            count after compaction, all parameters counted once as ``num_parameters()`` does (embeddings
            included), as a fraction of the dense model's (``0 < x < 1``) or an absolute count (``x >= 1``).
            Whole units go until the size is at or below the target (the closest size not above it for the
            planner's split between heads and channels; a unit counts its bias entries too); the remainder is
            reported.
        sequential: calibrate each block on the output of the blocks before it *as pruned* (as Wanda's and
            SparseGPT's reference code do; two passes per block); False uses the dense model's activations
            (one pass per block, faster, usually slightly worse; see bench/RESULTS.md, section 'Calibration
            order: default, one pass, true-sequential').
        true_sequential: within each block too, calibrate each projection on its inputs with the projections
            before it already pruned (SparseGPT's ``--true-sequential``: q/k/v, then o, then gate/up, then
            down), in about one pass per block instead of two (:mod:`~mosaic_lightning.calibration.true_sequential`; it
            caches submodule outputs, about ``(d + 2 d_ff) x tokens`` values). Needs ``sequential`` and a method
            that prunes one projection at a time (not SparseLLM/StructPrune), without whole units.
    """

    sparsity: float = 0.5
    method: Any = "wanda"
    allocation: Any = "uniform"
    pattern: str = "unstructured"
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    min_sparsity: float = 0.0
    max_sparsity: float = 0.99
    structured_fraction: float = 0.0
    structured_units: list[str] = field(default_factory=lambda: ["mlp", "heads"])
    structure_lambda: float = 0.08
    uniform_structure: bool = False
    whole_units: bool = False
    target_params: float | None = None
    sequential: bool = True
    true_sequential: bool = False

    def __post_init__(self) -> None:
        for name in ("sparsity", "min_sparsity", "max_sparsity", "structured_fraction", "structure_lambda"):
            _check_number(name, getattr(self, name))
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity}; allowed values: 0 <= sparsity < 1")
        if not 0 <= self.min_sparsity <= self.max_sparsity < 1:
            raise ValueError(
                f"min_sparsity={self.min_sparsity}, max_sparsity={self.max_sparsity}; "
                "need 0 <= min_sparsity <= max_sparsity < 1"
            )
        if not 0 <= self.structure_lambda < 0.5:
            raise ValueError(f"structure_lambda={self.structure_lambda}; allowed values: 0 <= structure_lambda < 0.5")
        for name in ("targets", "exclude"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"{name}={getattr(self, name)!r}; give a list of names or regexes, e.g. ['down']")
            for pattern in getattr(self, name) or ():
                check_pattern(pattern, name)
        self.method: PruningMethod = resolve_method(self.method)
        self.allocation: Allocation = resolve_allocation(self.allocation)
        uniform = isinstance(self.allocation, Uniform)
        if not uniform and not self.min_sparsity <= self.sparsity <= self.max_sparsity:
            raise ValueError(
                f"sparsity={self.sparsity} lies outside min_sparsity={self.min_sparsity}..max_sparsity="
                f"{self.max_sparsity}, which bound every projection"
            )
        self._parsed_pattern = pattern = parse_pattern(self.pattern)
        fixed = pattern.fixed_sparsity
        if fixed is not None:
            if abs(self.sparsity - fixed) > 1e-9:
                raise ValueError(f"pattern={self.pattern!r} fixes sparsity at {fixed}; set sparsity={fixed}")
            if not uniform:
                raise ValueError(
                    f"allocation={self.allocation.label!r} gives each projection its own sparsity, which "
                    f"pattern={self.pattern!r} (fixed at {fixed}) cannot take; use allocation='uniform', an "
                    f"unstructured pattern, or 'mixed:{pattern.m}' (N:M with N per projection)"
                )
        self._check_structure(pattern)
        self._check_true_sequential()

    def _check_true_sequential(self) -> None:
        if not self.true_sequential:
            return
        if not self.sequential:
            raise ValueError("true_sequential=True needs sequential=True (it prunes each block as it goes)")
        if self.structured:
            raise ValueError(
                f"true_sequential=True with structured_fraction={self.structured_fraction}: whole units are "
                "chosen from the block as it entered; use structured_fraction=0 or true_sequential=False"
            )
        if type(self.method).prune_block is not PruningMethod.prune_block:
            raise ValueError(
                f"true_sequential=True: method {self.method.label!r} prunes each block jointly (its own "
                "prune_block); true_sequential applies to methods that prune one projection at a time"
            )

    def _check_structure(self, pattern: Pattern) -> None:
        if not 0 <= self.structured_fraction <= 1:
            raise ValueError(f"structured_fraction={self.structured_fraction}; allowed values: 0 <= x <= 1")
        unknown = [u for u in self.structured_units if u not in UNIT_KINDS]
        if unknown or not self.structured_units:
            raise ValueError(f"structured_units={self.structured_units!r}; allowed values: {list(UNIT_KINDS)}")
        if self.whole_units and self.structured_fraction != 1:
            raise ValueError(
                f"whole_units=True with structured_fraction={self.structured_fraction}: whole units only means "
                "structured only; set structured_fraction=1"
            )
        if self.target_params is not None:
            _check_number("target_params", self.target_params)
            if not self.whole_units:
                raise ValueError("target_params needs whole_units=True (a size is reached by removing whole units)")
            if self.target_params <= 0 or (self.target_params > 1 and self.target_params != int(self.target_params)):
                raise ValueError(
                    f"target_params={self.target_params!r}; allowed values: a fraction 0 < x < 1 of the dense "
                    "model's parameters, or a whole number of parameters >= 1"
                )
        if self.structured_fraction > 0 and isinstance(pattern, NM | MixedNM):
            raise ValueError(
                f"structured_fraction={self.structured_fraction} needs an unstructured pattern, not "
                f"pattern={self.pattern!r} (N:M fixes the sparsity of what structure leaves)"
            )

    @property
    def structured(self) -> bool:
        return self.structured_fraction > 0

    def bounds(self) -> tuple[float, float]:
        """Per-projection sparsity bounds for the exact renormalisation (uniform: whatever the target is)."""
        if isinstance(self.allocation, Uniform):
            return 0.0, 1.0
        return self.min_sparsity, self.max_sparsity

    @property
    def counts_biases(self) -> bool:
        """A size target counts the model's parameters, so a removed unit's bias entries count with its weights."""
        return self.target_params is not None

    def target_param_count(self, dense_params: int) -> int | None:
        """``target_params`` as a parameter count: a fraction of ``dense_params``, or the count itself."""
        if self.target_params is None:
            return None
        value = self.target_params
        return round(value * dense_params) if value < 1 else int(value)

    @property
    def parsed_pattern(self) -> Pattern:
        """``pattern`` as parsed once, when the config was checked."""
        return self._parsed_pattern

    def to_dict(self) -> dict:
        """Plain values; method and allocation as ``{"class_path", "init_args"}`` (checkpoints, reports)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_config() if isinstance(value, Component) else _copy(value)
        return out


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}={value!r}; must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}; must be a finite number")


def _copy(value):
    return list(value) if isinstance(value, list) else value
