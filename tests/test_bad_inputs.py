"""Bad input found before any work, with the field or file named, and nothing changed: non-finite weights, token
ids that are not ids of this vocabulary, invalid ``targets`` regexes, export directories that cannot be created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_state_unchanged, make_llama, random_batches, state_copy, write_text_files

from mosaic_lightning import PruningConfig, prune_model
from mosaic_lightning.export.save import check_export_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_module(method, value):
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value  # the last block
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: its weights contain NaN or inf"):
        prune_model(model, random_batches(), PruningConfig(0.5, method, "uniform"), progress=False)
    assert_state_unchanged(model, before)


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [
        ([torch.rand(2, 16)], TypeError, r"calibration_batches\[0\] is torch.float32; give integer token ids"),
        ([torch.randint(0, 128, (2, 16)), torch.full((2, 16), 128)], ValueError,
         r"calibration_batches\[1\] holds token ids in \[128, 128\], outside the model's vocabulary \[0, 128\)"),
        ([torch.full((2, 16), -1)], ValueError, r"calibration_batches\[0\] holds token ids in \[-1, -1\]"),
        ([[1, 2, 3]], TypeError, r"calibration_batches\[0\] is list"),
    ],
)  # fmt: skip
def test_bad_token_ids_are_refused_before_any_work(batches, error, message):
    model = make_llama()
    before = state_copy(model)
    with pytest.raises(error, match=message):
        prune_model(model, batches, PruningConfig(0.5, "wanda", "uniform"), progress=False)
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("field", ["targets", "exclude"])
def test_invalid_regex_names_the_field(field):
    with pytest.raises(ValueError, match=rf"{field} item 'q_proj\[\(' is not a valid regular expression"):
        PruningConfig(0.5, **{field: ["q_proj[("]})


def test_export_dir_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"export_dir=.*a_file/out.*lies under .*a_file.*which is a file"):
        check_export_dir(blocker / "out")
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="is a link to nothing"):
        check_export_dir(link)
    assert blocker.read_text() == "mine" and link.is_symlink()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_export_dir_under_a_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="is not writable"):
            check_export_dir(parent / "out")
    finally:
        parent.chmod(0o700)


def test_cli_refuses_an_export_dir_under_a_file_before_loading_the_model(tmp_path, tiny_model_dir):
    train, test = write_text_files(tmp_path)
    blocker = tmp_path / "results"
    blocker.write_text("a user's file")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "recipes/wanda-50.yaml"),
         "--model.pretrained", str(tiny_model_dir), "--data.train_files", str(train), "--data.eval_files", str(test),
         "--trainer.logger", "false", "--export_dir", str(blocker / "pruned")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "export_dir=" in result.stderr and "which is a file" in result.stderr
    assert "pruning blocks" not in result.stderr  # refused before any pruning work
    assert blocker.read_text() == "a user's file"
