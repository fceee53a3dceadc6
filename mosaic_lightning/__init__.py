"""mosaic-lightning: composite projection pruning for LLMs as PyTorch Lightning callbacks."""

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
