"""Perplexity against Hugging Face's own causal-LM loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_batches

from mosaic_lightning import perplexity


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_perplexity_equals_exp_mean_hf_loss(request, fixture):
    model = request.getfixturevalue(fixture)
    batches = random_batches(num=3, batch=2, seq_len=12, seed=7)  # equal-length windows
    with torch.no_grad():
        losses = [float(model(input_ids=ids, labels=ids, use_cache=False).loss) for ids in batches]
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(model, batches, progress=False) == pytest.approx(expected, rel=1e-4)
    # Dict batches (as a DataLoader over TokenWindows yields) give the same number.
    dict_batches = [{"input_ids": ids} for ids in batches]
    assert perplexity(model, dict_batches, progress=False) == pytest.approx(expected, rel=1e-4)


def test_perplexity_restores_training_mode_and_sees_pruning(llama):
    batches = random_batches(num=2, seed=8)
    llama.train()
    dense = perplexity(llama, batches, progress=False)
    assert llama.training
    with torch.no_grad():
        llama.lm_head.weight.mul_(3.0)  # sharper, wrong logits on random data
    assert perplexity(llama, batches, progress=False) > dense
