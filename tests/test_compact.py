"""Composite pruning and compaction: units removed whole, exact totals, same function in a smaller model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BUILDERS, TARGET_PARAMS, assert_state_unchanged, make_llama, random_batches, state_copy
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mosaic_lightning import PruningConfig, compact_model, load_pruned, prune_model, save_pruned
from mosaic_lightning.core.structure import check_kept_heads

INPUT = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def _composite(model, uniform: bool, fraction: float = 0.6, **extra):
    config = PruningConfig(
        sparsity=0.5, allocation="mosaic", structured_fraction=fraction, uniform_structure=uniform, **extra
    )
    return prune_model(model, random_batches(), config, progress=False)


def _zeros(model, names) -> tuple[int, int]:
    params = dict(model.named_parameters())
    return sum(int((params[n] == 0).sum()) for n in names), sum(params[n].numel() for n in names)


@pytest.mark.parametrize("uniform", [False, True])
def test_composite_total_is_exact_and_mostly_structural(arch, uniform):
    model = BUILDERS[arch]()
    outcome = _composite(model, uniform)
    zeros, total = _zeros(model, TARGET_PARAMS[arch])
    assert abs(outcome.report.achieved_sparsity - 0.5) < 1e-3
    assert abs(zeros / total - 0.5) < 1e-3  # counted in the weights, not taken from the report
    share = outcome.report.structured_params_removed / total
    assert 0.25 < share <= 0.5
    assert any(outcome.structure.values())


def test_removed_units_are_all_zero_slices(llama):
    outcome = _composite(llama, uniform=False)
    layer = llama.model.layers[0]
    for channel in outcome.structure["0.mlp"]:
        assert not layer.mlp.gate_proj.weight[channel].any()
        assert not layer.mlp.up_proj.weight[channel].any()
        assert not layer.mlp.down_proj.weight[:, channel].any()
    head_dim = llama.config.hidden_size // llama.config.num_attention_heads
    for head in outcome.structure["0.heads"]:
        span = slice(head * head_dim, (head + 1) * head_dim)
        assert not layer.self_attn.q_proj.weight[span].any()
        assert not layer.self_attn.o_proj.weight[:, span].any()


def test_gqa_removes_equal_query_heads_per_kv_group():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=16, vocab_size=128)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    outcome = _composite(model, uniform=True, fraction=0.9)
    for layer in range(2):
        removed = outcome.structure[f"{layer}.heads"]
        per_group = [sum(1 for h in removed if h // 4 == g) for g in range(2)]
        assert per_group[0] == per_group[1] > 0
        assert not model.model.layers[layer].self_attn.k_proj.weight.eq(0).all(dim=1).any()  # k/v kept whole


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_live_compacted_model_keeps_its_logits_in_every_attention_kernel(attention, kv_heads):
    """The compacted model in memory (what training after compaction runs), multi-head and grouped-query:
    eager attention repeats each key/value head once per query head of its group, so the group size must match
    the heads kept."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=128, attn_implementation=attention)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    outcome = _composite(model, uniform=True, fraction=0.9)
    assert all(outcome.structure[f"{layer}.heads"] for layer in range(2))
    with torch.no_grad():
        masked = model(input_ids=INPUT).logits
        compact_model(model, outcome.structure)
        torch.testing.assert_close(model(input_ids=INPUT).logits, masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("uniform", [False, True])
def test_compaction_keeps_logits_and_shrinks(arch, uniform, tmp_path):
    model = BUILDERS[arch]()
    outcome = _composite(model, uniform)
    with torch.no_grad():
        masked = model(input_ids=INPUT).logits
    before = sum(p.numel() for p in model.parameters())
    compact_model(model, outcome.structure)
    after = sum(p.numel() for p in model.parameters())
    assert before - after >= outcome.report.structured_params_removed * 0.99
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT).logits, masked, rtol=0, atol=1e-5)

    save_pruned(model, None, tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=INPUT).logits, masked, rtol=0, atol=1e-5)


def test_uniform_llama_compaction_loads_with_plain_transformers(tmp_path):
    model = make_llama()
    outcome = _composite(model, uniform=True)
    with torch.no_grad():
        masked = model(input_ids=INPUT).logits
    compact_model(model, outcome.structure)
    save_pruned(model, None, tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.intermediate_size < 128
    assert not hasattr(plain.config, "mosaic_layer_shapes")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=INPUT).logits, masked, rtol=0, atol=1e-5)


def test_per_layer_shapes_refuse_plain_loading(tmp_path):
    model = make_llama()
    outcome = _composite(model, uniform=False)
    compact_model(model, outcome.structure)
    save_pruned(model, None, tmp_path / "out")
    shapes = model.config.mosaic_layer_shapes
    assert len({s["mlp"] for s in shapes}) > 1  # per-layer sizes really differ
    with pytest.raises(RuntimeError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_compacted_per_layer_shapes_round_trip_compressed(tmp_path):
    model = make_llama()
    compact_model(model, _composite(model, uniform=False).structure)
    save_pruned(model, None, tmp_path / "dense")
    save_pruned(model, None, tmp_path / "packed", compress=True)
    dense_bytes = (tmp_path / "dense/model.safetensors").stat().st_size
    assert (tmp_path / "packed/model.safetensors").stat().st_size < 0.9 * dense_bytes
    config = json.loads((tmp_path / "packed/config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    assert len({s["mlp"] for s in config["mosaic_layer_shapes"]}) > 1  # per-layer sizes: load_pruned rebuilds them
    reloaded = load_pruned(tmp_path / "packed")
    for name, param in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name].view(torch.uint8), param.view(torch.uint8)), name


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_structured_fraction_outside_range_is_rejected(llama, fraction):
    before = state_copy(llama)
    with pytest.raises(ValueError, match="structured_fraction"):
        _composite(llama, uniform=False, fraction=fraction)
    assert_state_unchanged(llama, before)


def test_structure_with_nm_pattern_is_rejected():
    with pytest.raises(ValueError, match="unstructured pattern"):
        PruningConfig(sparsity=0.5, pattern="2:4", structured_fraction=0.5)


def test_structure_needs_coupled_projections_targeted(llama):
    with pytest.raises(ValueError, match="not targeted"):
        _composite(llama, uniform=False, exclude=["down"])


def test_gqa_head_count_error_names_nearest_valid_sizes():
    with pytest.raises(ValueError, match=r"nearest valid sizes: \[6, 9\]"):
        check_kept_heads(num_heads=9, num_kv_heads=3, kept=7)
    check_kept_heads(num_heads=9, num_kv_heads=3, kept=6)


def test_load_pruned_takes_the_read_weights_yet_edits_never_reach_the_files(tmp_path):
    """``load_pruned`` assigns the tensors it reads as parameters (held once): training the loaded model in place
    must still leave the export on disk as it was."""
    model = make_llama()
    save_pruned(model, None, tmp_path / "out")
    on_disk = (tmp_path / "out" / "model.safetensors").read_bytes()
    loaded = load_pruned(tmp_path / "out")
    assert not any(p.is_meta for p in loaded.parameters())
    got, want = loaded.state_dict(), model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        for parameter in loaded.parameters():
            parameter.mul_(0)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == on_disk
