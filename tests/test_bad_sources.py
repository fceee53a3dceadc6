"""Bad model directories, training files and checkpoints are refused before any work with our own message, which
names the argument and the file and says what was expected: no random weights behind a
warning, no message from deep inside transformers, safetensors or torch, and never advice to load unsafely."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_text_files
from safetensors.torch import load_file, save_file

from mosaic_lightning import CausalLM, TextDataModule
from mosaic_lightning.core.assets import load_causal_lm, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _cli(tmp_path: Path, model: Path | str, *extra: str) -> subprocess.CompletedProcess:
    train, test = write_text_files(tmp_path)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "recipes/wanda-50.yaml"),
         "--model.pretrained", str(model), "--data.train_files", str(train), "--data.eval_files", str(test),
         "--data.seq_len", "16", "--data.max_eval_windows", "2", "--trainer.logger", "false",
         "--export_dir", str(tmp_path / "export"), *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _without(folder: Path, tensor: str) -> None:
    weights = load_file(folder / "model.safetensors")
    del weights[tensor]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_missing_tensors_is_refused_unless_allowed(tmp_path, tiny_model_dir):
    _without(tiny_model_dir, "model.layers.1.mlp.down_proj.weight")
    before = _digest(tiny_model_dir)
    result = _cli(tmp_path, tiny_model_dir)
    assert result.returncode == 1
    assert f"pretrained='{tiny_model_dir}' lacks 1 tensors" in result.stderr
    assert "model.layers.1.mlp.down_proj.weight" in result.stderr and "allow_missing_weights" in result.stderr
    assert "pruning blocks" not in result.stderr and not (tmp_path / "export").exists()
    assert _digest(tiny_model_dir) == before
    model = load_causal_lm(str(tiny_model_dir), allow_missing_weights=True)  # the explicit flag: loads, as asked
    assert model.model.layers[1].mlp.down_proj.weight.shape == (32, 64)


@pytest.mark.parametrize("case", ["absolute", "relative", "a file", "no config.json", "truncated safetensors"])
def test_model_source_that_cannot_load_is_refused_naming_it(tmp_path, tiny_model_dir, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tiny_model_dir / "model.safetensors"
    source, message = {
        "absolute": (str(tmp_path / "nowhere"), "no such directory"),
        "relative": ("./models/nowhere", "no such directory"),
        "a file": (str(weights), "is a file; expected a Hugging Face model directory"),
        "no config.json": (str(tiny_model_dir), "is a directory without config.json"),
        "truncated safetensors": (str(tiny_model_dir), "model.safetensors is not a readable safetensors file"),
    }[case]
    if case == "no config.json":
        (tiny_model_dir / "config.json").unlink()
    if case == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _digest(tiny_model_dir)
    with pytest.raises((OSError, ValueError), match=message) as caught:
        CausalLM(source)  # at construction: the CLI instantiates it before reading any data
    assert f"pretrained={source!r}" in str(caught.value)
    assert _digest(tiny_model_dir) == before


def test_hub_form_name_that_does_not_load_says_it_is_no_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"tokenizer='nobody/no-such-model' could not be loaded as a hub id \(there is "
                                      r"no local directory .*nobody/no-such-model\)"):  # fmt: skip
        load_tokenizer("nobody/no-such-model")


def test_binary_training_file_is_refused_naming_the_file(tmp_path, tiny_model_dir):
    _, test = write_text_files(tmp_path)
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    data = TextDataModule(tokenizer=str(tiny_model_dir), train_files=str(binary), eval_files=str(test))
    with pytest.raises(ValueError, match=r"train_files: .*data\.bin is not UTF-8 text \(byte 128"):
        data.setup()


class _Hostile:
    """Unpickling this runs code (it creates the marker file): what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (shutil.copy, (__file__, str(self.marker)))


@pytest.mark.parametrize("case", ["hostile pickle in a zip", "hostile raw pickle", "truncated", "empty", "a tensor"])
def test_bad_ckpt_path_is_refused_before_any_work_and_never_advises_unsafe_loading(tmp_path, tiny_model_dir, case):
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "bad.ckpt"
    if case == "hostile pickle in a zip":
        torch.save({"state_dict": {}, "loops": {}, "payload": _Hostile(marker)}, ckpt)
    elif case == "hostile raw pickle":
        ckpt.write_bytes(pickle.dumps(_Hostile(marker)))
    elif case == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "loops": {}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:2000])
    elif case == "empty":
        ckpt.write_bytes(b"")
    else:
        torch.save(torch.zeros(3), ckpt)
    before = ckpt.read_bytes()
    result = _cli(tmp_path, tiny_model_dir, "--ckpt_path", str(ckpt))
    assert result.returncode == 1
    expected = {"hostile pickle in a zip": "holds objects other than tensors and plain containers (shutil.copy)",
                "a tensor": "is a torch file but not a Lightning training checkpoint"}  # fmt: skip
    assert f"ckpt_path='{ckpt}' " + expected.get(case, "is not a readable checkpoint") in result.stderr
    assert "weights_only=False" not in result.stderr and "add_safe_globals" not in result.stderr
    assert not marker.exists() and ckpt.read_bytes() == before
    assert "dense perplexity" not in result.stderr and not (tmp_path / "export").exists()
    assert not os.path.exists(tmp_path / "lightning_logs")
