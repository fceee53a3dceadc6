"""Atomic export: loadable HF directory, existing directories refused and left alone, no temp dir leaks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_batches
from transformers import AutoModelForCausalLM

from mosaic_lightning import PruningConfig, prune_model, save_pruned


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_saved_directory_loads_with_identical_logits(request, fixture, tmp_path):
    model = request.getfixturevalue(fixture)
    batches = random_batches()
    outcome = prune_model(model, batches, PruningConfig(sparsity=0.5, method="wanda"), progress=False)
    target = tmp_path / "nested" / "pruned"

    path = save_pruned(model, None, target, report=outcome.report)
    assert path == target.absolute() and path.is_dir()
    assert (path / "model.safetensors").is_file()
    saved_report = json.loads((path / "pruning_report.json").read_text())
    assert saved_report["achieved_sparsity"] == pytest.approx(0.5)
    assert (path / "sparsity_heatmap.png").stat().st_size > 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["pruned"]  # no temp dir left beside it

    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded) is type(model)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(loaded.get_parameter(name), param, rtol=0, atol=0, msg=name)


def test_empty_existing_directory_is_replaced(llama, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    save_pruned(llama, None, target)
    assert (target / "config.json").is_file()


def test_refuses_non_empty_directory_and_leaves_it_untouched(llama, tmp_path):
    target = tmp_path / "existing"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="export_dir"):
        save_pruned(llama, None, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_refuses_an_existing_file(llama, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"x")
    with pytest.raises(FileExistsError):
        save_pruned(llama, None, target)
    assert target.read_bytes() == b"x"


class _FailingModel:
    def save_pretrained(self, path, **kwargs):
        (path / "model.safetensors").write_bytes(b"partial")  # half-written, then the disk fills up
        raise OSError("No space left on device")


def test_failure_leaves_no_temp_dir_and_no_target(tmp_path):
    (tmp_path / "other").mkdir()
    target = tmp_path / "pruned"
    with pytest.raises(OSError, match="No space left"):
        save_pruned(_FailingModel(), None, target)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


class _FailingTokenizer:
    def save_pretrained(self, path):
        raise RuntimeError("tokenizer broke")


def test_tokenizer_failure_cleans_up_too(llama, tmp_path):
    target = tmp_path / "pruned"
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        save_pruned(llama, _FailingTokenizer(), target)
    assert list(tmp_path.iterdir()) == []
