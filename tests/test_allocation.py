"""Allocation: exact integer counts on target within bounds; OWL and the published Mosaic formula against an
independent computation on a tiny model (hooks on every projection, ratios and formula written out here)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mosaic_lightning import PruningConfig, prune_model
from mosaic_lightning.allocation import (
    OWL,
    AllocationContext,
    Mosaic,
    Uniform,
    exact_counts,
    outlier_ratios,
    resolve_allocation,
)
from mosaic_lightning.core.adapters import ModelAdapter


def _outward_bounds(n: int, lo: float, hi: float) -> tuple[int, int]:
    """Integer counts that are within [lo, hi] up to the rounding of one weight."""
    return math.floor(lo * n + 1e-9), math.ceil(hi * n - 1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_exact_counts_sum_exactly_to_target_and_respect_bounds(seed):
    rng = random.Random(seed)
    sizes = {f"p{i}": rng.choice([100, 400, 1000, 4096, 8192]) for i in range(rng.randint(1, 12))}
    target = rng.choice([0.1, 0.3, 0.5, 0.55, 0.7, 0.9])
    lo, hi = rng.choice([(0.0, 0.99), (0.2, 0.8), (0.4, 0.6), (0.0, 1.0)])
    if not lo <= target <= hi:
        lo, hi = 0.0, 0.99
    lam = rng.choice([0.0, 0.05, 0.2])
    sparsity = {k: target + rng.uniform(-lam, lam) for k in sizes}

    counts = exact_counts(sizes, sparsity, target, lo, hi)

    assert counts.keys() == sizes.keys()
    assert all(isinstance(c, int) for c in counts.values())
    assert sum(counts.values()) == round(target * sum(sizes.values()))
    for k, n in sizes.items():
        low, high = _outward_bounds(n, lo, hi)
        assert low <= counts[k] <= high, (k, counts[k], n, lo, hi)


def test_exact_counts_follow_the_requested_shape():
    sizes = {"a": 1000, "b": 1000, "c": 1000}
    counts = exact_counts(sizes, {"a": 0.3, "b": 0.5, "c": 0.7}, 0.5, 0.0, 0.99)
    assert counts == {"a": 300, "b": 500, "c": 700}
    # Shifted by a constant: the shift is solved so the total is on target, shape kept.
    counts = exact_counts(sizes, {"a": 0.4, "b": 0.6, "c": 0.8}, 0.5, 0.0, 0.99)
    assert counts == {"a": 300, "b": 500, "c": 700}


def test_exact_counts_clip_at_bounds_and_redistribute():
    sizes = {"a": 1000, "b": 1000}
    counts = exact_counts(sizes, {"a": 0.9, "b": 0.1}, 0.5, 0.0, 0.6)
    assert counts == {"a": 600, "b": 400}
    counts = exact_counts(sizes, {"a": 0.9, "b": 0.1}, 0.5, 0.45, 0.99)
    assert counts == {"a": 550, "b": 450}


@pytest.mark.parametrize(
    ("sizes", "sparsity", "hi"),
    [
        ({"a": 4096, "b": 4096}, {"a": 0.7, "b": 0.3}, 0.6),  # two 64x64 projections
        ({"a": 10, "b": 10}, {"a": 0.9, "b": 0.1}, 0.55),
    ],
)
def test_exact_counts_rounding_respects_max_bound_when_integer_feasible(sizes, sparsity, hi):
    # An integer solution within bounds exists (e.g. a = floor(hi * n_a), b = goal - a), yet 'a' gets
    # floor(hi * n_a) + 1: 2458/4096 = 60.01% > 60%, or 6/10 = 60% > 55%.
    counts = exact_counts(sizes, sparsity, 0.5, 0.0, hi)
    assert sum(counts.values()) == round(0.5 * sum(sizes.values()))
    for k, n in sizes.items():
        assert counts[k] <= math.floor(hi * n), (k, counts[k], n)


@pytest.mark.parametrize(("lo", "hi"), [(0.6, 0.9), (0.0, 0.4)])
def test_exact_counts_infeasible_bounds_raise(lo, hi):
    with pytest.raises(ValueError, match="min_sparsity") as info:
        exact_counts({"a": 100, "b": 100}, {"a": 0.5, "b": 0.5}, 0.5, lo, hi)
    assert "max_sparsity" in str(info.value)


def test_outlier_ratios_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    scores = {
        "0.q": torch.rand(8, 16, generator=g) ** 4,
        "0.k": torch.rand(4, 16, generator=g) ** 8,
        "1.q": torch.rand(8, 16, generator=g),
        "1.k": torch.randn(4, 16, generator=g).abs() ** 3,
    }
    threshold = 2.5
    # Per projection.
    per_proj = outlier_ratios(scores, {k: [k] for k in scores}, threshold)
    for k, s in scores.items():
        assert per_proj[k] == pytest.approx(float((s > threshold * s.double().mean()).sum()) / s.numel(), abs=1e-12)
    # Per layer: the mean is over all scores of the group, not an average of projection means.
    groups = {k: [f"layer{k[0]}"] for k in scores}
    per_layer = outlier_ratios(scores, groups, threshold)
    assert per_layer.keys() == {"layer0", "layer1"}
    for layer in ("0", "1"):
        flat = torch.cat([s.flatten() for k, s in scores.items() if k.startswith(layer)])
        direct = float((flat > threshold * flat.double().mean()).sum()) / flat.numel()
        assert direct > 0
        assert per_layer[f"layer{layer}"] == pytest.approx(direct, abs=1e-12)


TYPES = ("q", "k", "v", "o", "gate", "up", "down")
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
LAYERS = 5


def _deep_llama() -> LlamaForCausalLM:
    """Five layers, so min-max normalisation over layers and the per-type mean are not degenerate."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # heavy-tailed weights: outlier counts then differ between layers and types
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) ** 3 * 4)
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 24), generator=g) for _ in range(3)]


def _wanda_scores_by_hand(model) -> dict[tuple[int, str], torch.Tensor]:
    """|W| * ||X_j|| with X every token entering each projection of the dense model (one full forward)."""
    sq: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(model.model.layers):
        for t, path in MODULES.items():

            def hook(_m, args, key=(layer, t)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[key] = sq.get(key, 0) + (x * x).sum(0)

            handles.append(block.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in _batches():
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return {
        (layer, t): model.model.layers[layer].get_submodule(MODULES[t]).weight.abs() * sq[(layer, t)].sqrt().float()
        for layer in range(LAYERS) for t in TYPES
    }  # fmt: skip


def _ratio(scores: torch.Tensor, m: float) -> float:
    flat = scores.flatten().double()
    return float((flat > m * flat.mean()).sum()) / flat.numel()


def _minmax(values: list[float], lam: float) -> list[float]:
    lo, hi = min(values), max(values)
    return [2 * lam * (v - lo) / (hi - lo) for v in values]


def _mosaic_by_hand(model, s: float, m: float = 5.0, lam: float = 0.08) -> dict[str, float]:
    scores = _wanda_scores_by_hand(model)
    d_layer = [_ratio(torch.cat([scores[(i, t)].flatten() for t in TYPES]), m) for i in range(LAYERS)]
    a = _minmax(d_layer, lam)
    offset = {}
    for t in TYPES:
        b = _minmax([_ratio(scores[(i, t)], m) for i in range(LAYERS)], lam)
        offset[t] = sum(b) / LAYERS
    return {f"{i}.{t}": max(s - a[i] + offset[t], 0) or 0.01 for i in range(LAYERS) for t in TYPES}


def _allocate(allocation, model, s: float):
    return allocation.allocate(AllocationContext(model, ModelAdapter(model), _batches(), progress=False), s)


def test_mosaic_allocation_is_the_published_formula():
    model = _deep_llama()
    budget = _allocate(Mosaic(), model, 0.6)
    expected = _mosaic_by_hand(model, 0.6)
    assert budget.sparsity.keys() == expected.keys()
    for key, value in expected.items():
        assert budget.sparsity[key] == pytest.approx(value, abs=1e-9), key
    # Not degenerate: layers and types really differ.
    assert len({round(v, 9) for v in expected.values()}) > LAYERS
    scores = _wanda_scores_by_hand(model)
    for (layer, t), sc in scores.items():  # the reported ratio is the projection's own D_{t,l}
        assert budget.ratios[f"{layer}.{t}"] == pytest.approx(_ratio(sc, 5.0), abs=1e-12)


def test_mosaic_values_at_or_below_zero_become_the_reference_floor():
    model = _deep_llama()
    budget = _allocate(Mosaic(lam=0.45), model, 0.05)  # s - A_l + mean B < 0 for the most outlier-heavy layers
    expected = _mosaic_by_hand(model, 0.05, lam=0.45)
    assert 0.01 in expected.values()
    assert budget.sparsity == pytest.approx(expected, abs=1e-9)


def test_mosaic_through_prune_model_is_the_formula_renormalised_exactly():
    """The one deliberate deviation from the reference: a single shift makes the total exact."""
    model = _deep_llama()
    expected = _mosaic_by_hand(model, 0.6)
    report = prune_model(model, _batches(), PruningConfig(0.6, "magnitude", "mosaic"), progress=False).report
    sizes = {p.key: p.numel for p in report.projections}
    assert sum(round(p.requested_sparsity * p.numel) for p in report.projections) == round(0.6 * sum(sizes.values()))
    shifts = [p.requested_sparsity - expected[p.key] for p in report.projections]
    assert max(shifts) - min(shifts) <= 2 / min(sizes.values())
    assert all(p.achieved_sparsity == p.requested_sparsity for p in report.projections)


def _mosaic_variant_by_hand(model, s: float, offset: str, m: float = 5.0, lam: float = 0.08) -> dict[str, float]:
    """Each offset mode's formula, written out: A_l (layer), B_{t,l} (per type, min-max over layers)."""
    scores = _wanda_scores_by_hand(model)
    d_layer = [_ratio(torch.cat([scores[(i, t)].flatten() for t in TYPES]), m) for i in range(LAYERS)]
    a = _minmax(d_layer, lam)
    b = {t: _minmax([_ratio(scores[(i, t)], m) for i in range(LAYERS)], lam) for t in TYPES}
    mean_a = sum(a) / LAYERS
    mean_b = {t: sum(b[t]) / LAYERS for t in TYPES}
    formula = {
        "published": lambda i, t: s - a[i] + mean_b[t],
        "off": lambda i, t: s - (a[i] - mean_a),
        "flipped": lambda i, t: s - a[i] - mean_b[t],
        "centred": lambda i, t: s - (b[t][i] - mean_b[t]),
    }[offset]
    return {f"{i}.{t}": formula(i, t) if formula(i, t) > 0 else 0.01 for i in range(LAYERS) for t in TYPES}


@pytest.mark.parametrize("threshold", [5.0, 3.0])
@pytest.mark.parametrize("offset", ["published", "off", "flipped", "centred"])
def test_mosaic_offset_modes_are_their_formulas(offset, threshold):
    model = _deep_llama()
    budget = _allocate(Mosaic(threshold=threshold, offset=offset), model, 0.6)
    expected = _mosaic_variant_by_hand(model, 0.6, offset, m=threshold)
    assert budget.sparsity.keys() == expected.keys()
    for key, value in expected.items():
        assert budget.sparsity[key] == pytest.approx(value, abs=1e-9), key
    assert 0.01 not in expected.values()  # the formula itself, not the floor, is what is compared here
    if offset == "published":  # the default is the published formula, and the older hand computation agrees
        assert expected == pytest.approx(_mosaic_by_hand(model, 0.6, m=threshold), abs=1e-12)
        assert Mosaic(threshold=threshold).allocate(
            AllocationContext(model, ModelAdapter(model), _batches(), progress=False), 0.6
        ).sparsity == budget.sparsity


def test_mosaic_offset_modes_differ_and_off_is_owl():
    model = _deep_llama()
    by_mode = {o: _allocate(Mosaic(offset=o), model, 0.7).sparsity for o in ("published", "off", "flipped", "centred")}
    owl = _allocate(OWL(), model, 0.7).sparsity
    assert by_mode["off"] == pytest.approx(owl, abs=1e-12)
    modes = list(by_mode)
    for i, x in enumerate(modes):  # four different allocations, not one under four names
        for y in modes[i + 1 :]:
            assert max(abs(by_mode[x][k] - by_mode[y][k]) for k in owl) > 1e-3, (x, y)
    # Published and flipped differ by twice the per-type offset, the same for every layer of a type.
    for t in TYPES:
        gaps = {round(by_mode["published"][f"{i}.{t}"] - by_mode["flipped"][f"{i}.{t}"], 12) for i in range(LAYERS)}
        assert len(gaps) == 1, t
    # Centred: every type averages the target over the layers (each type has one size per layer).
    for t in TYPES:
        assert sum(by_mode["centred"][f"{i}.{t}"] for i in range(LAYERS)) / LAYERS == pytest.approx(0.7, abs=1e-12)


@pytest.mark.parametrize("offset", ["published", "off", "flipped", "centred"])
def test_mosaic_offset_modes_through_prune_model_are_exact(offset):
    """Every mode: the formula plus one shift, and the parameter-weighted total exactly on target."""
    model = _deep_llama()
    expected = _mosaic_variant_by_hand(model, 0.6, offset)
    config = PruningConfig(0.6, "magnitude", Mosaic(offset=offset))
    report = prune_model(model, _batches(), config, progress=False).report
    sizes = {p.key: p.numel for p in report.projections}
    assert sum(round(p.requested_sparsity * p.numel) for p in report.projections) == round(0.6 * sum(sizes.values()))
    assert report.achieved_sparsity == pytest.approx(round(0.6 * sum(sizes.values())) / sum(sizes.values()), abs=1e-12)
    shifts = [p.requested_sparsity - expected[p.key] for p in report.projections]
    assert max(shifts) - min(shifts) <= 2 / min(sizes.values())
    assert all(p.achieved_sparsity == p.requested_sparsity for p in report.projections)


@pytest.mark.parametrize("offset", ["published", "off", "flipped", "centred"])
def test_mosaic_offset_modes_floor_at_the_reference_value(offset):
    model = _deep_llama()
    budget = _allocate(Mosaic(lam=0.45, offset=offset), model, 0.05)
    expected = _mosaic_variant_by_hand(model, 0.05, offset, lam=0.45)
    assert 0.01 in expected.values()
    assert budget.sparsity == pytest.approx(expected, abs=1e-9)


def test_mosaic_offset_is_recorded_for_recipes():
    config = Mosaic(threshold=3, offset="centred").to_config()
    assert config == {"class_path": "mosaic_lightning.allocation.mosaic.Mosaic",
                      "init_args": {"threshold": 3, "lam": 0.08, "offset": "centred"}}  # fmt: skip
    assert resolve_allocation(config).offset == "centred"
    assert Mosaic().offset == "published"


def test_owl_allocation_is_the_layerwise_formula():
    model = _deep_llama()
    budget = _allocate(OWL(), model, 0.7)
    scores = _wanda_scores_by_hand(model)
    d_layer = [_ratio(torch.cat([scores[(i, t)].flatten() for t in TYPES]), 5.0) for i in range(LAYERS)]
    a = _minmax(d_layer, 0.08)
    mean = sum(a) / LAYERS
    for i in range(LAYERS):
        for t in TYPES:
            assert budget.sparsity[f"{i}.{t}"] == pytest.approx(0.7 - (a[i] - mean), abs=1e-9)


def test_uniform_allocation_reads_no_calibration_data():
    model = _deep_llama()
    budget = Uniform().allocate(AllocationContext(model, ModelAdapter(model), [], progress=False), 0.4)
    assert set(budget.sparsity.values()) == {0.4} and not budget.ratios


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bogus", "allocation='bogus'; allowed values: ['energy', 'mosaic', 'msp', 'owl', 'uniform']"),
        ({"class_path": "owl", "init_args": {"threshold": 0.0}}, "threshold=0.0"),
        ({"class_path": "owl", "init_args": {"threshold": float("nan")}}, "threshold=nan"),
        ({"class_path": "mosaic_lightning.allocation.Mosaic", "init_args": {"lam": 0.5}}, "lam=0.5"),
        ({"class_path": "mosaic", "init_args": {"offset": "centered"}},
         "offset='centered'; allowed values: ['published', 'off', 'flipped', 'centred']"),
        ({"class_path": "mosaic", "init_args": {"offset": None}}, "offset=None; allowed values"),
        ({"class_path": "mosaic_lightning.methods.Wanda"}, "is not a subclass of mosaic_lightning.allocation"),
        ({"class_path": "no_such_module.Alloc"}, "cannot import module 'no_such_module'"),
    ],
)
def test_bad_allocations_are_refused_with_the_field_named(value, message):
    with pytest.raises(ValueError) as info:
        resolve_allocation(value)
    assert message in str(info.value)
