"""Llama-family architectures share the adapter: Mistral, Qwen2 (biased q/k/v), Gemma, Gemma3 (text)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batches
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mosaic_lightning import ModelAdapter, PruningConfig, compact_model, prune_model

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, head_dim=16)  # fmt: skip
FAMILY = {
    "mistral": (MistralForCausalLM, MistralConfig),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config),
    "gemma": (GemmaForCausalLM, GemmaConfig),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_llama_family_prunes_and_compacts(name):
    model_class, config_class = FAMILY[name]
    torch.manual_seed(0)
    model = model_class(config_class(**SIZES)).eval()
    adapter = ModelAdapter(model)
    assert [p.name for p in adapter.projections(0)] == ["q", "k", "v", "o", "gate", "up", "down"]
    config = PruningConfig(0.5, "wanda", "mosaic", structured_fraction=0.6, uniform_structure=True)
    outcome = prune_model(model, random_batches(), config, progress=False)
    assert abs(outcome.report.achieved_sparsity - 0.5) < 1e-3
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        compact_model(model, outcome.structure)
        torch.testing.assert_close(model(input_ids=ids).logits, masked, rtol=0, atol=1e-5)
