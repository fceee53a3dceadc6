"""Pruning methods (*which weights*). A new method is one new file here: a :class:`PruningMethod` subclass with
a ``name`` shorthand; a user's own subclass elsewhere works through ``class_path``."""

from __future__ import annotations

from .base import PruneResult, PruningMethod
from .magnitude import Magnitude
from .random_scores import RandomScores
from .sparsegpt import SparseGPT
from .sparsellm import SparseLLM
from .structprune import StructPrune
from .wanda import Wanda


def resolve_method(value, field: str = "method") -> PruningMethod:
    """A method from a shorthand (``"wanda"``), ``{"class_path", "init_args"}`` or an instance."""
    from ..core.components import resolve

    return resolve(value, PruningMethod, __name__, field)


__all__ = [
    "Magnitude",
    "PruneResult",
    "PruningMethod",
    "RandomScores",
    "SparseGPT",
    "SparseLLM",
    "StructPrune",
    "Wanda",
    "resolve_method",
]
