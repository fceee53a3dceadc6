"""Compaction for every family the adapter claims: a tiny random Llama, Mistral, Qwen2, Gemma,
Gemma3, OPT and GPT-2, composite-pruned (MLP channels and heads), compacted, saved and reloaded with the same logits;
where the family's own config could not state a head count, ``uniform_structure`` keeps only counts it can state
(MLP channels only where there is none), so plain ``from_pretrained`` loads the export."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import make_gpt2, make_opt, random_batches

from mosaic_lightning import PruningConfig, compact_model, load_pruned, prune_model, save_pruned

_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip
FAMILIES = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_SIZES)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_SIZES)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_SIZES)),  # no head_dim field of its own
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**_SIZES, head_dim=16)),
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_SIZES, head_dim=16)),
    "opt": make_opt,
    "gpt2": make_gpt2,
}
INPUT = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(5))


def _compacted_export(build, uniform: bool, folder):
    torch.manual_seed(0)
    model = build().eval()
    config = PruningConfig(sparsity=0.5, allocation="mosaic", structured_fraction=0.6, uniform_structure=uniform)
    structure = prune_model(model, random_batches(), config, progress=False).structure
    with torch.no_grad():
        expected = model(input_ids=INPUT).logits
    compact_model(model, structure)
    save_pruned(model, None, folder)
    return structure, expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_layer_compaction_saves_and_reloads_for_every_family(tmp_path, family):
    structure, expected = _compacted_export(FAMILIES[family], False, tmp_path / "out")
    assert any(key.endswith(".heads") and units for key, units in structure.items())  # heads really removed
    with torch.no_grad():
        logits = load_pruned(tmp_path / "out")(input_ids=INPUT).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "gemma3"])
def test_uniform_compaction_loads_with_plain_from_pretrained(tmp_path, family):
    _, expected = _compacted_export(FAMILIES[family], True, tmp_path / "out")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not hasattr(model.config, "mosaic_layer_shapes")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT).logits, expected, rtol=0, atol=1e-5)


def _llama_mha_5_heads():
    """80 wide, 5 heads of 16: LlamaConfig refuses 3 heads (80 % 3 != 0) even with an explicit head_dim."""
    return T.LlamaForCausalLM(T.LlamaConfig(**{**_SIZES, "hidden_size": 80, "num_attention_heads": 5,
                                               "num_key_value_heads": 5}))  # fmt: skip


@pytest.mark.parametrize(
    ("build", "kept_heads"),
    [(make_opt, {4}), (make_gpt2, {4}), (_llama_mha_5_heads, {5, 4, 2, 1})],
    ids=["opt", "gpt2", "llama-80-wide-5-heads"],
)  # fmt: skip
def test_uniform_structure_keeps_only_head_counts_the_config_can_state(tmp_path, build, kept_heads):
    """OPT and GPT-2 cannot state fewer heads, so MLP channels take the structured share; Llama 80 wide cannot
    state 3 heads (80 % 3), so 3 is never kept. Either way plain from_pretrained loads the compacted export."""
    _, expected = _compacted_export(build, True, tmp_path / "out")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    heads = getattr(reloaded.config, "num_attention_heads", None) or reloaded.config.n_head
    assert heads in kept_heads
    assert not hasattr(reloaded.config, "mosaic_layer_shapes")  # one size in every layer, stated by the config
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=INPUT).logits, expected, rtol=0, atol=1e-5)
