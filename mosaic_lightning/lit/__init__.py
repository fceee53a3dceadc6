"""LightningModule and DataModule for causal language models."""

from .data import TextDataModule
from .module import CausalLM

__all__ = ["CausalLM", "TextDataModule"]
