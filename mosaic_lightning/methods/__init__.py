"""Pruning methods by name. A new method is a new file here plus one line in :data:`METHODS`."""

from __future__ import annotations

from .base import PruneResult, PruningMethod
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, type[PruningMethod]] = {m.name: m for m in (Magnitude, Wanda, SparseGPT)}


def build_method(name: str, **options) -> PruningMethod:
    if name not in METHODS:
        raise ValueError(f"method={name!r}; allowed values: {sorted(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "Magnitude", "PruneResult", "PruningMethod", "SparseGPT", "Wanda", "build_method"]
