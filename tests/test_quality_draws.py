"""The quality bench's calibration draws: seeded, different per seed, seed 0 the draw of every earlier table, the
held-out windows the same for every seed; cells aggregate the draws (mean, min, max, wall time per draw)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_bench_script

from mosaic_lightning.allocation import OWL, Mosaic
from mosaic_lightning.core.assets import BUNDLED_MODEL, load_tokenizer


@pytest.fixture(scope="module")
def quality():
    return load_bench_script("quality")


def test_calibration_draws_differ_by_seed_and_held_out_windows_do_not(quality):
    tokenizer = load_tokenizer(BUNDLED_MODEL)
    draws = [quality.calibration_and_heldout(tokenizer, 8, 4, 128, seed) for seed in range(2)]
    calibration = [torch.cat(c) for c, _ in draws]
    for c in calibration:
        assert c.shape == (8, 128)
    assert not torch.equal(calibration[0], calibration[1])
    assert torch.equal(torch.cat(quality.calibration_and_heldout(tokenizer, 8, 4, 128)[0]), calibration[0])
    assert torch.equal(torch.cat(draws[0][0]), calibration[0])  # seeded: the same seed, the same windows
    for _, heldout in draws[1:]:
        assert torch.equal(torch.cat(heldout), torch.cat(draws[0][1]))


def test_cells_aggregate_the_draws(quality):
    def row(variant, seed, ppl):
        return {"method": "wanda", "variant": variant, "sparsity": 0.7, "pattern": "unstructured", "seed": seed,
                "ppl": ppl, "prune_s": 10.0 + seed, "wall_s": 20.0 + seed}  # fmt: skip

    results = [{"method": "dense", "ppl": 18.5}, row("owl", 0, 500.0), row("mosaic-M5-published", 0, 700.0),
               row("owl", 1, 540.0), row("mosaic-M5-published", 1, 650.0), row("owl", 2, 520.0)]  # fmt: skip
    cells = {c["allocation"]: c for c in quality.spread(results)}
    assert cells.keys() == {"owl", "mosaic-M5-published"}
    assert cells["owl"]["ppl_mean"] == pytest.approx(520.0) and cells["owl"]["draws"] == 3
    assert (cells["owl"]["ppl_min"], cells["owl"]["ppl_max"], cells["owl"]["seeds"]) == (500.0, 540.0, [0, 1, 2])
    assert cells["owl"]["wall_s"] == [20.0, 21.0, 22.0]
    assert cells["mosaic-M5-published"]["ppl_mean"] == pytest.approx(675.0)


def test_variant_labels(quality):
    assert quality.variant(Mosaic()) == "mosaic-M5-published"
    assert quality.variant(Mosaic(threshold=3, offset="centred")) == "mosaic-M3-centred"
    assert quality.variant(OWL()) == "owl"


def test_an_ordering_is_stated_only_where_it_holds_on_every_draw(quality):
    def cell(allocation, ppl):
        return {"method": "sparsegpt", "allocation": allocation, "sparsity": 0.7, "pattern": "unstructured",
                "draws": len(ppl), "seeds": list(range(len(ppl))), "ppl": ppl,
                "ppl_mean": sum(ppl) / len(ppl)}  # fmt: skip

    cells = [cell("uniform", [180.0, 190.0, 185.0]), cell("owl", [170.0, 175.0, 186.0]),
             cell("flipped", [160.0, 165.0, 170.0]), cell("published", [175.0, 170.0, 181.0]),
             cell("one draw", [1.0])]  # fmt: skip
    chain, held = quality.orderings(cells)
    # by mean: flipped 165 < published 175.3 ~ owl 177 (owl lower on draw 1) ~ uniform 185 (owl higher on draw 2)
    assert chain == ("70% unstructured: sparsegpt flipped < sparsegpt published ~ sparsegpt owl ~ sparsegpt uniform")
    assert held.split(": ", 1)[1].split("; ") == [
        "sparsegpt flipped < sparsegpt published", "sparsegpt flipped < sparsegpt owl",
        "sparsegpt flipped < sparsegpt uniform", "sparsegpt published < sparsegpt uniform",
    ]  # fmt: skip


def test_true_sequential_flag_sets_the_order_on_every_selected_row(quality):
    def selected(*flags: str) -> list:
        argv = ["--suite", "mosaic-variants", "--methods", "sparsegpt", "--sparsities", "0.5", *flags]
        return quality.configs(quality.parse_args(argv))

    default, true_sequential = selected(), selected("--true-sequential")
    assert [quality.variant(c.allocation) for c in true_sequential] == [quality.variant(c.allocation) for c in default]
    assert {(c.method.label, c.sparsity) for c in true_sequential} == {("sparsegpt", 0.5)}
    assert not any(c.true_sequential for c in default) and all(c.true_sequential for c in true_sequential)
    with pytest.raises(SystemExit):  # the order suite sets each row's order itself
        quality.parse_args(["--suite", "order", "--true-sequential"])


def test_table_never_compares_cells_calibrated_on_different_token_counts(quality, tmp_path):
    def campaign(name: str, samples: int, cpu_s: float, uniform: list[float], owl: list[float]) -> str:
        cells = [{"method": "sparsegpt", "allocation": allocation, "sparsity": 0.7, "pattern": "unstructured",
                  "draws": 3, "seeds": [0, 1, 2], "ppl": ppl, "ppl_mean": sum(ppl) / 3, "ppl_min": min(ppl),
                  "ppl_max": max(ppl), "wall_s": [1.0, 1.0, 1.0]}
                 for allocation, ppl in (("uniform", uniform), ("owl", owl))]  # fmt: skip
        path = tmp_path / name
        path.write_text(json.dumps({"args": {"calibration_samples": samples, "seq_len": 512}, "cpu_s": cpu_s,
                                    "wall_s": cpu_s / 2, "cells": cells}))  # fmt: skip
        return str(path)

    # compared across sizes, owl at 128 windows would rank below uniform at 32 windows on every draw
    small = campaign("small.json", 32, 1800.0, uniform=[180.0, 182.0, 184.0], owl=[170.0, 186.0, 168.0])
    large = campaign("large.json", 128, 5400.0, uniform=[176.0, 177.0, 178.0], owl=[155.0, 161.0, 156.0])
    text = quality.spread_table([small, large])
    assert "| sparsegpt | owl | 70% | 128 x 512 | 3 | 157.33 | 155.00 | 161.00 | 1 / 1 / 1 |" in text
    assert "total: 7200 s CPU (2.0 h) over 2 file(s)" in text
    assert "70% unstructured, 32 x 512 calibration: sparsegpt owl ~ sparsegpt uniform" in text
    assert "70% unstructured, 128 x 512 calibration: sparsegpt owl < sparsegpt uniform" in text
    assert text.count("on every draw: ") == 2 and "on every draw: none" in text
