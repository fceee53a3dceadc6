"""Allocation: exact integer counts on target within bounds; outlier-weighted sparsities (OWL, Mosaic POD)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mosaic_lightning.allocation import OWL, MosaicPOD, Uniform, build_allocation, exact_counts, outlier_ratios


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


@pytest.mark.parametrize("cls", [OWL, MosaicPOD])
def test_more_outliers_means_lower_sparsity(cls):
    ratios = {"a": 0.010, "b": 0.050, "c": 0.020, "d": 0.035}
    sparsity = cls(threshold=5.0, lam=0.08).sparsities(ratios, 0.5)
    by_ratio = sorted(ratios, key=ratios.get)
    values = [sparsity[k] for k in by_ratio]
    assert all(x > y for x, y in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("lam", [0.0, 0.02, 0.08, 0.2])
def test_outlier_weighted_spread_is_two_lambda_centred_on_target(lam):
    ratios = {"a": 0.3, "b": 0.01, "c": 0.02, "d": 0.015, "e": 0.0}
    sparsity = MosaicPOD(lam=lam).sparsities(ratios, 0.6)
    values = torch.tensor(list(sparsity.values()), dtype=torch.float64)
    assert float(values.max() - values.min()) == pytest.approx(2 * lam, abs=1e-12)
    assert float(values.mean()) == pytest.approx(0.6, abs=1e-12)
    # OWL's rule, written out: ratios normalised to [0, 2 lam], centred, subtracted from the target.
    lo, hi = min(ratios.values()), max(ratios.values())
    norm = {k: (r - lo) / (hi - lo) * 2 * lam for k, r in ratios.items()}
    mean = sum(norm.values()) / len(norm)
    for k in ratios:
        assert sparsity[k] == pytest.approx(0.6 - (norm[k] - mean), abs=1e-12)


def test_equal_ratios_give_uniform_target():
    assert OWL().sparsities({"layer0": 0.02, "layer1": 0.02}, 0.5) == {"layer0": 0.5, "layer1": 0.5}
    assert Uniform().sparsities({"a": 0.9, "b": 0.0}, 0.4) == {"a": 0.4, "b": 0.4}


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
    per_proj = outlier_ratios(scores, {k: k for k in scores}, threshold)
    for k, s in scores.items():
        assert per_proj[k] == pytest.approx(float((s > threshold * s.double().mean()).sum()) / s.numel(), abs=1e-12)
    # Per layer: the mean is over all scores of the group, not an average of projection means.
    groups = {k: f"layer{k[0]}" for k in scores}
    per_layer = outlier_ratios(scores, groups, threshold)
    assert per_layer.keys() == {"layer0", "layer1"}
    for layer in ("0", "1"):
        flat = torch.cat([s.flatten() for k, s in scores.items() if k.startswith(layer)])
        direct = float((flat > threshold * flat.double().mean()).sum()) / flat.numel()
        assert direct > 0
        assert per_layer[f"layer{layer}"] == pytest.approx(direct, abs=1e-12)


def test_owl_groups_by_layer_and_pod_by_projection():
    class P:
        def __init__(self, layer, name):
            self.layer, self.name, self.key = layer, name, f"{layer}.{name}"

    assert OWL().group(P(3, "q")) == OWL().group(P(3, "down")) == "layer3"
    assert MosaicPOD().group(P(3, "q")) == "3.q" != MosaicPOD().group(P(3, "down"))


def test_build_allocation_validates():
    with pytest.raises(ValueError, match="allocation='bogus'") as info:
        build_allocation("bogus")
    for name in ("uniform", "owl", "mosaic"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="threshold"):
        build_allocation("owl", threshold=0.0)
    with pytest.raises(ValueError, match="0.5"):
        build_allocation("mosaic", lam=0.5)


def test_type_normalised_pod_compares_each_projection_with_its_type():
    """q has 10x the outliers of up in both layers: plain POD shifts budget from q to up, the type-normalised
    variant gives both types the target on average and favours layer 0 (2x its type's usual ratio) in each."""
    from mosaic_lightning.allocation import MosaicPOD, TypeNormalisedPOD

    ratios = {"0.q": 0.20, "1.q": 0.10, "0.up": 0.02, "1.up": 0.01}
    lam, target = 0.08, 0.5
    typed = TypeNormalisedPOD(lam=lam).sparsities(ratios, target)
    # relative ratios 4/3, 2/3, 4/3, 2/3 -> normalised to 2*lam, 0, 2*lam, 0 -> mean lam
    expected = {"0.q": target - lam, "1.q": target + lam, "0.up": target - lam, "1.up": target + lam}
    assert typed == pytest.approx(expected)
    plain = MosaicPOD(lam=lam).sparsities(ratios, target)
    assert plain["0.q"] < plain["1.q"] < target < plain["0.up"] < plain["1.up"]
