"""Pruning configuration, validated as a whole before any weight is touched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .allocation import ALLOCATIONS, Allocation, build_allocation
from .methods import METHODS, PruningMethod, build_method
from .patterns import Pattern, parse_pattern
from .structure import UNIT_KINDS


@dataclass
class PruningConfig:
    """What to prune and how. Every field is checked in ``__post_init__`` with an error naming it.

    Args:
        sparsity: fraction of the targeted projections' weights to prune, parameter-weighted, in [0, 1).
        method: which weights go: ``magnitude``, ``wanda`` or ``sparsegpt``.
        allocation: how much each projection is pruned: ``uniform``, ``owl`` (per layer), ``mosaic`` (POD,
            per projection) or ``mosaic-typed`` (POD relative to each projection type's mean).
        pattern: ``unstructured`` (compared per output row), ``unstructured-layer`` or ``N:M`` (e.g. ``2:4``).
        targets: projections to prune, by short name (q,k,v,o,gate,up,down) or module-name regex; None = all.
        exclude: projections to leave dense, same syntax.
        min_sparsity, max_sparsity: bounds on any one projection's sparsity under non-uniform allocation.
        outlier_threshold: a score is an outlier above this multiple of its group's mean (OWL's M, Mosaic's alpha).
        owl_lambda: spread of the outlier-weighted allocation: group sparsities span 2*lambda around the target.
        sparsegpt_blocksize, sparsegpt_damp: SparseGPT's column block size and relative Hessian damping.
        structured_fraction: share of the pruned weights removed as whole units (composite pruning), in
            [0, 1]; 0 = unstructured only, 1 = structured only. Robust (few-outlier) units take more of it.
        structured_units: unit kinds to remove: ``mlp`` (channels) and/or ``heads`` (attention heads).
        sequential: calibrate each block on the output of the blocks before it *as pruned* (as Wanda's and
            SparseGPT's reference code do; two passes per block); False uses the dense model's activations
            (one pass per block, faster, usually slightly worse).
        uniform_structure: remove the same number of units in every layer, so that a plain HF config
            describes the compacted model; otherwise per-layer sizes (load with ``load_pruned``).
    """

    sparsity: float = 0.5
    method: str = "wanda"
    allocation: str = "uniform"
    pattern: str = "unstructured"
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    min_sparsity: float = 0.0
    max_sparsity: float = 0.99
    outlier_threshold: float = 5.0
    owl_lambda: float = 0.08
    sparsegpt_blocksize: int = 128
    sparsegpt_damp: float = 0.01
    structured_fraction: float = 0.0
    structured_units: list[str] = field(default_factory=lambda: ["mlp", "heads"])
    uniform_structure: bool = False
    sequential: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float):
            raise TypeError(f"sparsity={self.sparsity!r}; must be a number in [0, 1)")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity}; allowed values: 0 <= sparsity < 1")
        if not 0 <= self.min_sparsity <= self.max_sparsity < 1:
            raise ValueError(
                f"min_sparsity={self.min_sparsity}, max_sparsity={self.max_sparsity}; "
                "need 0 <= min_sparsity <= max_sparsity < 1"
            )
        if self.allocation != "uniform" and not self.min_sparsity <= self.sparsity <= self.max_sparsity:
            raise ValueError(
                f"sparsity={self.sparsity} lies outside min_sparsity={self.min_sparsity}..max_sparsity="
                f"{self.max_sparsity}, which bound every projection"
            )
        if self.outlier_threshold <= 0:
            raise ValueError(f"outlier_threshold={self.outlier_threshold}; must be > 0 (OWL uses 3..7, often 5)")
        if not 0 <= self.owl_lambda < 0.5:
            raise ValueError(f"owl_lambda={self.owl_lambda}; allowed values: 0 <= owl_lambda < 0.5 (OWL: ~0.08)")
        if isinstance(self.sparsegpt_blocksize, bool) or not isinstance(self.sparsegpt_blocksize, int) or (
            self.sparsegpt_blocksize < 1
        ):
            raise ValueError(f"sparsegpt_blocksize={self.sparsegpt_blocksize!r}; must be a positive integer")
        if not 0 < self.sparsegpt_damp < 1:
            raise ValueError(f"sparsegpt_damp={self.sparsegpt_damp}; allowed values: 0 < sparsegpt_damp < 1")
        for name in ("targets", "exclude"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"{name}={getattr(self, name)!r}; give a list of names or regexes, e.g. ['down']")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; allowed values: {sorted(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r}; allowed values: {sorted(ALLOCATIONS)}")
        pattern = self.build_pattern()
        fixed = pattern.fixed_sparsity
        if fixed is not None:
            if abs(self.sparsity - fixed) > 1e-9:
                raise ValueError(f"pattern={self.pattern!r} fixes sparsity at {fixed}; set sparsity={fixed}")
            if self.allocation != "uniform":
                raise ValueError(
                    f"allocation={self.allocation!r} gives each projection its own sparsity, which "
                    f"pattern={self.pattern!r} (fixed at {fixed}) cannot take; use allocation='uniform' or an "
                    "unstructured pattern"
                )
        self.build_method()
        self.build_allocation()
        self._check_structure(pattern)

    def _check_structure(self, pattern: Pattern) -> None:
        if not 0 <= self.structured_fraction <= 1:
            raise ValueError(f"structured_fraction={self.structured_fraction}; allowed values: 0 <= x <= 1")
        unknown = [u for u in self.structured_units if u not in UNIT_KINDS]
        if unknown or not self.structured_units:
            raise ValueError(f"structured_units={self.structured_units!r}; allowed values: {list(UNIT_KINDS)}")
        if self.structured_fraction > 0 and pattern.fixed_sparsity is not None:
            raise ValueError(
                f"structured_fraction={self.structured_fraction} needs an unstructured pattern, not "
                f"pattern={self.pattern!r} (N:M fixes the sparsity of what structure leaves)"
            )

    @property
    def structured(self) -> bool:
        return self.structured_fraction > 0

    def build_method(self) -> PruningMethod:
        options = {}
        if self.method == "sparsegpt":
            options = {"blocksize": self.sparsegpt_blocksize, "damp": self.sparsegpt_damp}
        return build_method(self.method, **options)

    def build_allocation(self) -> Allocation:
        return build_allocation(self.allocation, threshold=self.outlier_threshold, lam=self.owl_lambda)

    def build_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict:
        return asdict(self)
