"""Sparsity patterns: exact counts, per-row spread, lowest scores pruned, N:M structure, clear errors."""

from __future__ import annotations

import pytest
import torch

from mosaic_lightning.core.patterns import NM, Unstructured, parse_pattern


def _scores(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


def _reference_row_keep(scores: torch.Tensor, num_prune: int) -> torch.Tensor:
    """Independent per-row rule: floor(k/rows) per row; the k % rows leftover prunes go to the rows whose
    next-lowest score (after their floor share) is the smallest."""
    rows, cols = scores.shape
    per_row, extra = divmod(num_prune, rows)
    ranked = scores.argsort(dim=1)
    counts = [per_row] * rows
    if extra:
        next_scores = [float(scores[r, ranked[r, per_row]]) for r in range(rows)]
        for r in sorted(range(rows), key=lambda r: next_scores[r])[:extra]:
            counts[r] += 1
    keep = torch.ones_like(scores, dtype=torch.bool)
    for r in range(rows):
        keep[r, ranked[r, : counts[r]]] = False
    return keep


@pytest.mark.parametrize(("rows", "cols", "num_prune"), [(8, 16, 0), (8, 16, 64), (8, 16, 37), (5, 7, 34), (6, 9, 54)])
def test_unstructured_row_prunes_exactly_k_spread_per_row(rows, cols, num_prune):
    scores = _scores(rows, cols, seed=rows * 100 + num_prune)
    keep = Unstructured("row").keep_mask(scores, num_prune)

    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert int((~keep).sum()) == num_prune
    per_row = (~keep).sum(dim=1)
    assert set(per_row.tolist()) <= {num_prune // rows, -(-num_prune // rows)}  # floor or ceil
    assert int((per_row > num_prune // rows).sum()) == num_prune % rows
    torch.testing.assert_close(keep, _reference_row_keep(scores, num_prune), rtol=0, atol=0)


def test_unstructured_row_prunes_the_lowest_scores_of_each_row():
    scores = _scores(16, 32, seed=3)
    keep = Unstructured("row").keep_mask(scores, 16 * 12)
    for r in range(16):
        pruned, kept = scores[r][~keep[r]], scores[r][keep[r]]
        assert pruned.numel() == 12
        assert pruned.max() < kept.min()


def test_unstructured_layer_scope_prunes_global_lowest_k():
    scores = _scores(12, 20, seed=4)
    # Make some rows much lower than others so a per-row rule would give a different answer.
    scores[:3] *= 0.01
    k = 70
    keep = Unstructured("layer").keep_mask(scores, k)
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[scores.flatten().argsort()[:k]] = False
    torch.testing.assert_close(keep, expected.view_as(scores), rtol=0, atol=0)
    assert int((~keep[:3]).sum()) == 60  # the three scaled-down rows are pruned entirely


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_unstructured_accepts_non_contiguous_scores(scope):
    base = _scores(10, 6, seed=5)
    scores = base.t()  # [6, 10] view of a [10, 6] tensor, as a Conv1D weight's [out, in] view is
    assert not scores.is_contiguous()
    keep = Unstructured(scope).keep_mask(scores, 23)
    torch.testing.assert_close(keep, Unstructured(scope).keep_mask(scores.contiguous(), 23), rtol=0, atol=0)
    assert int((~keep).sum()) == 23


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_unstructured_rejects_counts_out_of_range(scope):
    scores = _scores(4, 4)
    with pytest.raises(ValueError, match="num_prune"):
        Unstructured(scope).keep_mask(scores, 17)
    with pytest.raises(ValueError, match="num_prune"):
        Unstructured(scope).keep_mask(scores, -1)
    assert Unstructured(scope).keep_mask(scores, 16).sum() == 0


def test_unstructured_rejects_unknown_scope():
    with pytest.raises(ValueError, match="scope") as info:
        Unstructured("column")
    assert "'row'" in str(info.value) and "'layer'" in str(info.value)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_keeps_exactly_n_largest_of_every_m(n, m):
    rows, cols = 6, 4 * m
    scores = _scores(rows, cols, seed=n * 10 + m)
    pattern = NM(n, m)
    keep = pattern.keep_mask(scores, rows * cols // m * (m - n))

    groups_keep = keep.view(rows, cols // m, m)
    groups_scores = scores.view(rows, cols // m, m)
    assert (groups_keep.sum(dim=-1) == n).all()
    expected = torch.zeros_like(groups_keep)
    expected.scatter_(-1, groups_scores.topk(n, dim=-1).indices, True)
    torch.testing.assert_close(groups_keep, expected, rtol=0, atol=0)
    assert pattern.fixed_sparsity == pytest.approx(1 - n / m)


def test_nm_rejects_wrong_count():
    with pytest.raises(ValueError, match="exactly 16"):
        NM(2, 4).keep_mask(_scores(4, 8), 15)


def test_nm_check_shape_names_m_and_width():
    NM(2, 4).check_shape(64, "q")  # divides: no error
    with pytest.raises(ValueError) as info:
        NM(2, 3).check_shape(64, "model.layers.0.self_attn.q_proj")
    message = str(info.value)
    assert "M=3" in message and "64" in message and "model.layers.0.self_attn.q_proj" in message
    assert "pattern='2:3'" in message


@pytest.mark.parametrize(("n", "m"), [(0, 4), (4, 4), (5, 4)])
def test_nm_rejects_n_outside_0_m(n, m):
    with pytest.raises(ValueError, match=f"{n}:{m}"):
        NM(n, m)


def test_parse_pattern_builds_each_kind():
    assert isinstance(parse_pattern("unstructured"), Unstructured)
    assert parse_pattern("unstructured").scope == "row"
    assert parse_pattern("unstructured-layer").scope == "layer"
    nm = parse_pattern("2:4")
    assert isinstance(nm, NM) and (nm.n, nm.m) == (2, 4)
    assert parse_pattern("4:8").fixed_sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("spec", ["bogus", "2-4", "2:4:8", "", "Unstructured", "a:b"])
def test_parse_pattern_error_names_field_and_allowed_values(spec):
    with pytest.raises(ValueError) as info:
        parse_pattern(spec)
    message = str(info.value)
    assert f"pattern={spec!r}" in message
    for allowed in ("'unstructured'", "'unstructured-layer'", "N:M"):
        assert allowed in message


def test_mixed_nm_derives_n_from_the_count_and_refuses_counts_off_its_steps():
    scores = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    pattern = parse_pattern("mixed:8")
    assert pattern.quantum(4, 16) == 8 and pattern.fixed_sparsity is None
    keep = pattern.keep_mask(scores, 5 * 8)  # 5 of every 8 pruned: 3:8
    assert torch.equal(keep, parse_pattern("3:8").keep_mask(scores, 5 * 8))
    for bad in (5 * 8 + 1, 0, 8 * 8):
        with pytest.raises(ValueError, match="is not k/8 of it"):
            pattern.keep_mask(scores, bad)
    with pytest.raises(ValueError, match="allowed values: .*'mixed:M'"):
        parse_pattern("mixed")
