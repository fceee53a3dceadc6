"""Perplexity on held-out windows with torchmetrics: ``exp(mean NLL)`` over every predicted token."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm


def update_perplexity(metric: Perplexity, logits: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Score token ``t+1`` from positions ``<= t``: the same tokens HF's shifted causal-LM loss uses."""
    metric.update(logits[:, :-1].float(), input_ids[:, 1:])


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable, progress: bool = True, desc: str = "perplexity") -> float:
    """Perplexity of a causal LM over ``batches`` (tensors of ``input_ids`` or dicts holding them)."""
    device = next(model.parameters()).device
    metric = Perplexity().to(device)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress):
            ids = (batch["input_ids"] if isinstance(batch, dict) else batch).to(device)
            update_perplexity(metric, model(input_ids=ids, use_cache=False).logits, ids)
    finally:
        model.train(was_training)
    return float(metric.compute())
