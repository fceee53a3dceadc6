"""mosaic-lightning: composite projection pruning for LLMs as PyTorch Lightning callbacks."""

from .adapters import ArchitectureSpec, ModelAdapter
from .callbacks import MosaicPruning
from .config import PruningConfig
from .engine import PruningOutcome, prune_model
from .evaluation import perplexity
from .export import save_pruned
from .lit import CausalLM, TextDataModule
from .masks import MaskStore
from .report import PruningReport

__all__ = [
    "ArchitectureSpec",
    "CausalLM",
    "MaskStore",
    "ModelAdapter",
    "MosaicPruning",
    "PruningConfig",
    "PruningOutcome",
    "PruningReport",
    "TextDataModule",
    "perplexity",
    "prune_model",
    "save_pruned",
]
