"""Lightning callbacks: thin glue between the training loop and the pruning engine."""

from .compact_on_fit_end import CompactOnFitEnd
from .lora_recovery import LoRARecovery
from .mosaic_pruning import MosaicPruning, causal_lm

__all__ = ["CompactOnFitEnd", "LoRARecovery", "MosaicPruning", "causal_lm"]
