"""mosaic-lightning: composite projection pruning for LLMs as PyTorch Lightning callbacks.

The names below load on first use (PEP 562), so ``from mosaic_lightning import prune_model`` (the numerics) does
not import Lightning, torchmetrics and what they pull in (their import time and resident memory); the callbacks, the
Lightning module and the data module do, when they are asked for.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _installed_version("mosaic-lightning")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "ArchitectureSpec": "core.adapters",
    "CausalLM": "lit",
    "CompactOnFitEnd": "callbacks",
    "LoRARecovery": "callbacks",
    "MaskStore": "core.masks",
    "ModelAdapter": "core.adapters",
    "MosaicPruning": "callbacks",
    "PruningConfig": "pruning.config",
    "PruningOutcome": "pruning.engine",
    "PruningReport": "core.report",
    "TextDataModule": "lit",
    "compact_model": "export.compact",
    "consolidated_copy": "core.consolidate",
    "load_pruned": "export.compact",
    "perplexity": "evaluation.perplexity",
    "prune_model": "pruning.engine",
    "save_pruned": "export.save",
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
    from .callbacks import CompactOnFitEnd, LoRARecovery, MosaicPruning
    from .core.adapters import ArchitectureSpec, ModelAdapter
    from .core.consolidate import consolidated_copy
    from .core.masks import MaskStore
    from .core.report import PruningReport
    from .evaluation.perplexity import perplexity
    from .export.compact import compact_model, load_pruned
    from .export.save import save_pruned
    from .lit import CausalLM, TextDataModule
    from .pruning.config import PruningConfig
    from .pruning.engine import PruningOutcome, prune_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
