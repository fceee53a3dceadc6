"""Uniform allocation: every projection at the target sparsity; measures nothing."""

from __future__ import annotations

from .base import Allocation, AllocationContext, Budget


class Uniform(Allocation):
    name = "uniform"

    def allocate(self, context: AllocationContext, target: float) -> Budget:
        return Budget(dict.fromkeys((p.key for p in context.projections), target))
