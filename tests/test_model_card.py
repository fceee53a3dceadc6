"""The export's README.md model card: hub front matter, recipe, per-type sparsity counted from the saved weights,
and the measured figures; through save_pruned and through the CLI with --data.dataset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import LLAMA_PROJECTIONS
from safetensors.torch import load_file

from mosaic_lightning import PruningConfig, prune_model, save_pruned
from mosaic_lightning.export.model_card import model_card

ROOT = Path(__file__).resolve().parents[1]


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def _table_rows(card: str, header: str) -> dict[str, list[str]]:
    """``| name | cells... |`` rows of the table that follows ``header``."""
    section = card.split(header, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_card_lists_recipe_per_type_sparsity_and_figures(llama, calib_batches, tmp_path):
    outcome = prune_model(llama, calib_batches, PruningConfig(0.5, "wanda", "mosaic"), progress=False)
    report = outcome.report
    report.metrics.update(ppl_dense=18.5, ppl_pruned=36.25)
    report.tasks = {"social_iqa_local": {"dense": {"acc": 0.356, "acc_stderr": 0.0214, "samples": 500},
                                         "pruned": {"acc": 0.34, "acc_stderr": 0.0212, "samples": 500}}}  # fmt: skip
    export = save_pruned(llama, None, tmp_path / "out", report, base_model="HuggingFaceTB/SmolLM2-135M")
    card = (export / "README.md").read_text()
    front = _front_matter(card)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M" and front["library_name"] == "transformers"
    assert {"pruned", "sparsity", "sparsity-50", "unstructured"} <= set(front["tags"])
    recipe = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe == json.loads(json.dumps(report.config))  # the whole recorded config, as YAML
    assert recipe["sparsity"] == 0.5 and recipe["allocation"]["class_path"].endswith(".Mosaic")
    # Per projection type, counted here from the saved weights (independent of the report).
    weights = load_file(str(export / "model.safetensors"))
    rows = _table_rows(card, "## Sparsity per projection type")
    shares = []
    for path in LLAMA_PROJECTIONS:
        tensors = [weights[f"model.layers.{i}.{path}.weight"] for i in range(2)]
        zeros, total = sum(int((t == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)
        name = path.rpartition(".")[2].removesuffix("_proj")  # the short names the project uses
        assert rows[name] == [f"{total:,}", f"{zeros:,}", f"{100 * zeros / total:.2f}%"], name
        shares.append(zeros / total)
    assert max(shares) - min(shares) > 0.01  # the allocation differs by type: the table is not one number
    assert rows["**all**"][2] == "50.00%"
    figures = _table_rows(card, "## Evaluation")
    assert figures["perplexity"] == ["18.5000", "36.2500"]
    assert figures["social_iqa_local acc (500 items)"] == ["0.3560 ± 0.0214", "0.3400 ± 0.0212"]


@pytest.mark.parametrize(("structured", "says", "omits"), [(0.0, "zeros kept in place", "physically smaller"),
                                                            (1.0, "physically smaller", "zeros kept in place")])
def test_card_says_what_the_sparsity_buys(llama, calib_batches, structured, says, omits):
    """Zeros in place buy no speed in standard runtimes; removed units do: the card says which this export has,
    with the weight counts the report holds."""
    config = PruningConfig(0.3, "wanda", "uniform", structured_fraction=structured, whole_units=structured == 1.0)
    report = prune_model(llama, calib_batches, config, progress=False).report
    section = model_card(report).split("## What the sparsity buys\n\n", 1)[1].split("\n## ", 1)[0]
    assert says in section and omits not in section
    count = report.structured_params_removed if structured else report.params_pruned
    assert f"{count:,} weights" in section


@pytest.mark.parametrize(("source", "expected"), [("bundled:smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                                  (".", None), ("not a hub id", None)])  # fmt: skip
def test_base_model_names_only_hub_ids(llama, calib_batches, tmp_path, source, expected):
    report = prune_model(llama, calib_batches, PruningConfig(0.3), progress=False).report
    card = (save_pruned(llama, None, tmp_path / "out", report, base_model=source) / "README.md").read_text()
    assert _front_matter(card).get("base_model") == expected
    assert "## Evaluation" not in card  # nothing was measured


def test_cli_export_with_a_jsonl_dataset_has_the_card(tmp_path, tiny_model_dir):
    rows = [{"body": " ".join(f"word{(i * 3 + j) % 61} text {j}." for j in range(60))} for i in range(40)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    export = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "recipes/wanda-50.yaml"),
         "--model.pretrained", str(tiny_model_dir), "--data.dataset", str(tmp_path / "corpus.jsonl"),
         "--data.eval_dataset", str(tmp_path / "corpus.jsonl"), "--data.text_column", "body",
         "--data.seq_len", "32", "--data.num_calibration_samples", "4", "--data.max_eval_windows", "2",
         "--trainer.logger", "false", "--export_dir", str(export)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "pruning_report.json").read_text())
    card = (export / "README.md").read_text()
    assert "base_model" not in _front_matter(card)  # a local directory is no hub id
    assert _table_rows(card, "## Evaluation")["perplexity"] == [f"{report['ppl_dense']:.4f}",
                                                                 f"{report['ppl_pruned']:.4f}"]  # fmt: skip
    assert str(tiny_model_dir) in card and report["tasks"] == {}
