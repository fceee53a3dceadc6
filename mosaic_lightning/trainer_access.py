"""How callbacks and schedules find things in a Lightning run: the HF model and each other (one place)."""

from __future__ import annotations

from typing import TypeVar

import lightning as L
from torch import nn

T = TypeVar("T", bound=L.Callback)


def causal_lm(pl_module: L.LightningModule) -> nn.Module:
    """The Hugging Face model inside a LightningModule (``.model``), or the module itself."""
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    if hasattr(pl_module, "config"):
        return pl_module
    raise TypeError(
        f"{type(pl_module).__name__} exposes no Hugging Face causal LM: set it as `self.model` "
        "(see mosaic_lightning.CausalLM)"
    )


def find_callback(trainer: L.Trainer, kind: type[T]) -> T | None:
    """The trainer's first callback of ``kind``, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)
