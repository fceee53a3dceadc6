"""mosaic-lightning: composite projection pruning for LLMs as PyTorch Lightning callbacks.

The names below load on first use (PEP 562), so ``from mosaic_lightning import prune_model`` (the numerics) does
not import Lightning, torchmetrics and what they pull in (about 190 MB of resident memory); the callbacks, the
Lightning module and the data module do, when they are asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ArchitectureSpec": "adapters",
    "CausalLM": "lit",
    "CompactOnFitEnd": "callbacks",
    "LoRARecovery": "callbacks",
    "MaskStore": "masks",
    "ModelAdapter": "adapters",
    "MosaicPruning": "callbacks",
    "PruningConfig": "config",
    "PruningOutcome": "engine",
    "PruningReport": "report",
    "TextDataModule": "lit",
    "compact_model": "compact",
    "consolidated_copy": "consolidate",
    "load_pruned": "compact",
    "perplexity": "evaluation",
    "prune_model": "engine",
    "save_pruned": "export",
}
__all__ = [
    "ArchitectureSpec",
    "CausalLM",
    "CompactOnFitEnd",
    "LoRARecovery",
    "MaskStore",
    "ModelAdapter",
    "MosaicPruning",
    "PruningConfig",
    "PruningOutcome",
    "PruningReport",
    "TextDataModule",
    "compact_model",
    "consolidated_copy",
    "load_pruned",
    "perplexity",
    "prune_model",
    "save_pruned",
]

if TYPE_CHECKING:
    from .adapters import ArchitectureSpec, ModelAdapter
    from .callbacks import CompactOnFitEnd, LoRARecovery, MosaicPruning
    from .compact import compact_model, load_pruned
    from .config import PruningConfig
    from .consolidate import consolidated_copy
    from .engine import PruningOutcome, prune_model
    from .evaluation import perplexity
    from .export import save_pruned
    from .lit import CausalLM, TextDataModule
    from .masks import MaskStore
    from .report import PruningReport


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
