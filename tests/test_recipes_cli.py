"""The method recipes through the CLI on a tiny local model, with the overrides our acceptance checks use:
``--model.pretrained <dir> --data.train_files <file> --data.eval_files <file> --export_dir <dir>`` plus
``--pruning.sparsity``, ``--pruning.allocation uniform`` and ``--data.num_calibration_samples``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_text_files
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def _fit_recipe(
    tmp_path: Path, model_dir: Path, recipe: str, *overrides: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """``train.py fit`` of a shipped recipe on the tiny model and local text files, with the acceptance overrides
    (and the small sizes every test here uses) before ``overrides``; returns the process and the export directory."""
    train, test = write_text_files(tmp_path)
    export = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / f"recipes/{recipe}.yaml"),
         "--model.pretrained", str(model_dir), "--data.train_files", str(train), "--data.eval_files", str(test),
         "--data.seq_len", "32", "--data.num_calibration_samples", "8", "--data.max_eval_windows", "2",
         "--trainer.logger", "false", "--export_dir", str(export), *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return result, export


@pytest.mark.parametrize(
    ("recipe", "overrides", "method", "allocation"),
    [
        ("mosaic-70", [], "SparseGPT", "Mosaic"),
        ("owl-70", [], "SparseGPT", "OWL"),
        ("sparsellm-70", ["--pruning.sparsity", "0.8"], "SparseLLM", "uniform"),
        ("sparsellm-70", ["--pruning.allocation", "uniform", "--pruning.sparsity", "0.6"], "SparseLLM", "uniform"),
        ("msp-75", ["--pruning.allocation.init_args.generations", "1"], "wanda", "MSP"),
        ("msp-75", ["--pruning.allocation", "uniform"], "wanda", "uniform"),
    ],
)
def test_recipe_runs_through_the_cli_with_the_acceptance_overrides(tmp_path, tiny_model_dir, recipe, overrides,
                                                                   method, allocation):  # fmt: skip
    result, export = _fit_recipe(tmp_path, tiny_model_dir, recipe, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "pruning_report.json").read_text())
    sparsity = float(overrides[overrides.index("--pruning.sparsity") + 1]) if "--pruning.sparsity" in overrides else (
        {"mosaic-70": 0.7, "owl-70": 0.7, "sparsellm-70": 0.7, "msp-75": 0.75}[recipe])  # fmt: skip
    assert report["achieved_sparsity"] == pytest.approx(sparsity, abs=1e-3)
    assert report["params_pruned"] == round(sparsity * report["params_targeted"])
    assert all(p["achieved_sparsity"] == p["requested_sparsity"] for p in report["projections"])
    assert method in json.dumps(report["config"]["method"]) and allocation in json.dumps(report["config"]["allocation"])
    assert report["calibration"]["batches"] == 2  # 8 samples in batches of 4
    assert report["config"]["true_sequential"] is (recipe == "owl-70")  # the order each recipe states
    if allocation == "MSP":
        assert report["allocation"]["history"] and (export / "allocation_search.png").stat().st_size > 0
    model = AutoModelForCausalLM.from_pretrained(export)
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("_proj.weight"))
    assert zeros >= report["params_pruned"]


def test_admm_recipe_runs_with_its_acceptance_overrides(tmp_path, tiny_model_dir):
    """recipes/admm-80 with --pruning.sparsity, --trainer.max_steps, --trainer.gradient_clip_val and
    --trainer.accumulate_grad_batches: the export holds exactly the target sparsity, per tensor."""
    result, export = _fit_recipe(
        tmp_path, tiny_model_dir, "admm-80", "--pruning.sparsity", "0.6", "--trainer.max_steps", "4",
        "--trainer.gradient_clip_val", "0.5", "--trainer.accumulate_grad_batches", "2",
        "--pruning.schedule.init_args.projection_every", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "pruning_report.json").read_text())
    assert report["params_pruned"] == round(0.6 * report["params_targeted"])
    assert report["admm_z_steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(export)
    for name, param in model.named_parameters():
        if name.endswith("_proj.weight"):
            assert abs(int((param == 0).sum()) - 0.6 * param.numel()) < 1, name


def test_recover_recipe_fine_tunes_for_max_steps_and_keeps_the_sparsity(tmp_path, tiny_model_dir):
    result, export = _fit_recipe(tmp_path, tiny_model_dir, "recover-70", "--trainer.max_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "pruning_report.json").read_text())
    assert report["params_pruned"] == round(0.7 * report["params_targeted"])
    model = AutoModelForCausalLM.from_pretrained(export)
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("_proj.weight"))
    assert zeros == report["params_pruned"]  # three fine-tuning steps regrew nothing


def test_shrink_recipe_refuses_a_size_target_out_of_reach_before_any_work(tmp_path, tiny_model_dir):
    result, export = _fit_recipe(tmp_path, tiny_model_dir, "shrink-30", "--pruning.target_params", "1000")
    assert result.returncode != 0
    assert "target_params=1000" in result.stderr and "out of reach" in result.stderr
    assert "perplexity" not in result.stdout + result.stderr  # the dense model was not even evaluated
    assert not export.exists()


def test_shrink_recipe_removes_structure_recovers_and_exports_a_plain_smaller_model(tmp_path, tiny_model_dir):
    """recipes/shrink-30 with the acceptance overrides: at least 30% of the projection weights physically gone
    (counted here from the shapes), distillation for --trainer.max_steps, the three perplexities in the report,
    and an export that plain from_pretrained loads."""
    result, export = _fit_recipe(tmp_path, tiny_model_dir, "shrink-30", "--trainer.max_steps", "2",
                                 "--data.batch_size", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "pruning_report.json").read_text())
    assert {"ppl_dense", "ppl_compacted", "ppl_pruned"} <= set(report)
    assert report["ppl_compacted"] != report["ppl_pruned"]  # training changed the compacted model
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(export)

    def projections(m) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if n.endswith("_proj.weight"))

    assert projections(model) <= 0.7 * projections(dense)
    assert model.num_parameters() == report["params_after_compaction"] == report["params_planned"]
    assert report["params_dense"] == dense.num_parameters()
    assert report["weights_bytes_dense"] == 4 * dense.num_parameters()  # the summary's "before" weight size
    assert all((p != 0).all() for n, p in model.named_parameters() if n.endswith("_proj.weight"))
