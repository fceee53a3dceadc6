"""Lightning callbacks: thin glue between the training loop and the pruning engine."""

from .compact_on_fit_end import CompactOnFitEnd
from .mosaic_pruning import MosaicPruning, causal_lm

__all__ = ["CompactOnFitEnd", "MosaicPruning", "causal_lm"]
