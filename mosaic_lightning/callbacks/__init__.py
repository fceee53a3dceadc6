"""Lightning callbacks: thin glue between the training loop and the pruning engine."""

from .mosaic_pruning import MosaicPruning, causal_lm

__all__ = ["MosaicPruning", "causal_lm"]
