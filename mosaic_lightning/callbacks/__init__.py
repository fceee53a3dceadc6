"""Lightning callbacks: thin glue between the training loop and the pruning engine."""

from ..trainer_access import causal_lm
from .compact_on_fit_end import CompactOnFitEnd
from .lora_recovery import LoRARecovery
from .mosaic_pruning import MosaicPruning

__all__ = ["CompactOnFitEnd", "LoRARecovery", "MosaicPruning", "causal_lm"]
