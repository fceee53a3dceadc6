"""compressed-tensors exports (``compress=True``): sparse-bitmask / sparse-24-bitmask as that package defines
them, weights back bit for bit through ``load_pruned``, atomic writing kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.config import (
    BitmaskConfig,
    Sparse24BitMaskConfig,
    SparsityCompressionConfig,
    SparsityStructure,
)
from conftest import BUILDERS, TARGET_PARAMS, random_batches, write_text_files
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mosaic_lightning import PruningConfig, load_pruned, prune_model, save_pruned

ROOT = Path(__file__).resolve().parents[1]


def _pruned(model, pattern: str = "unstructured"):
    prune_model(model, random_batches(), PruningConfig(sparsity=0.5, method="wanda", pattern=pattern), progress=False)
    return model


def _sparsity_config(path) -> SparsityCompressionConfig:
    entry = json.loads((path / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "compressed-tensors"
    sparsity = entry["sparsity_config"]
    return SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity)


def _assert_bit_identical(loaded, model) -> None:
    for name, param in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].view(torch.uint8), param.view(torch.uint8)), name


def _tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("build", [*sorted(BUILDERS), "tied-llama"])
def test_bitmask_export_round_trips_bit_exactly_and_is_smaller(build, tmp_path):
    model = _pruned(_tied_llama() if build == "tied-llama" else BUILDERS[build]())
    save_pruned(model, None, tmp_path / "dense")
    save_pruned(model, None, tmp_path / "packed", compress=True)

    config = _sparsity_config(tmp_path / "packed")
    assert isinstance(config, BitmaskConfig) and config.format == "sparse-bitmask"
    assert SparsityStructure(config.sparsity_structure) == SparsityStructure.UNSTRUCTURED
    stored = load_file(tmp_path / "packed/model.safetensors")
    compressed = [k.removesuffix(".bitmask") for k in stored if k.endswith(".bitmask")]
    assert sorted(f"{name}.weight" for name in compressed) == sorted(TARGET_PARAMS[build.removeprefix("tied-")])
    assert all(f"{name}.weight" not in stored and f"{name}.row_offsets" in stored for name in compressed)
    dense_bytes = (tmp_path / "dense/model.safetensors").stat().st_size
    assert (tmp_path / "packed/model.safetensors").stat().st_size < 0.8 * dense_bytes

    loaded = load_pruned(tmp_path / "packed")
    _assert_bit_identical(loaded, model)
    assert not hasattr(loaded.config, "quantization_config")  # dense in memory: saving it again writes dense
    save_pruned(loaded, None, tmp_path / "again")
    _assert_bit_identical(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), model)


def test_two_four_export_is_sparse_24_bitmask_for_compressed_tensors(tmp_path):
    model = _pruned(BUILDERS["llama"](), pattern="2:4")
    save_pruned(model, None, tmp_path / "packed", compress=True)

    config = _sparsity_config(tmp_path / "packed")
    assert isinstance(config, Sparse24BitMaskConfig) and config.format == "sparse-24-bitmask"
    assert SparsityStructure(config.sparsity_structure) == SparsityStructure.TWO_FOUR
    assert config.targets == ["Linear"] and config.ignore == ["lm_head"]
    stored = load_file(tmp_path / "packed/model.safetensors")
    rows, cols = model.model.layers[0].mlp.down_proj.weight.shape
    assert stored["model.layers.0.mlp.down_proj.compressed"].shape == (rows, cols // 2)
    assert stored["model.layers.0.mlp.down_proj.shape"].flatten().tolist() == [rows, cols]
    assert "model.layers.0.mlp.down_proj.row_offsets" not in stored
    _assert_bit_identical(load_pruned(tmp_path / "packed"), model)


def test_one_weight_off_two_four_gives_the_unstructured_format(tmp_path):
    model = _pruned(BUILDERS["llama"](), pattern="2:4")
    with torch.no_grad():
        weight = model.model.layers[1].self_attn.q_proj.weight
        weight[0, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 of 4 nonzero: no longer 2:4
    save_pruned(model, None, tmp_path / "packed", compress=True)
    assert _sparsity_config(tmp_path / "packed").format == "sparse-bitmask"
    _assert_bit_identical(load_pruned(tmp_path / "packed"), model)


def test_failure_while_compressing_leaves_nothing(llama, tmp_path, monkeypatch):
    def disk_full(directory, entry):
        raise OSError("No space left on device")

    monkeypatch.setattr("mosaic_lightning.export.compressed.write_config_entry", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_pruned(_pruned(llama), None, tmp_path / "packed", compress=True)
    assert list(tmp_path.iterdir()) == []  # no target, no temp dir with the shards already written


def test_quantized_compressed_tensors_config_is_refused(llama, tmp_path):
    save_pruned(_pruned(llama), None, tmp_path / "packed", compress=True)
    path = tmp_path / "packed/config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"]}}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization_config.*config_groups"):
        load_pruned(tmp_path / "packed")


def test_old_mosaic_format_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old/model.mosaic.safetensors").write_bytes(b"")
    old_format = r"model.mosaic.safetensors.*before mosaic-lightning 0\.1\.0 that no release reads"
    with pytest.raises(ValueError, match=old_format):
        load_pruned(tmp_path / "old")


def test_cli_compress_export_writes_sparse_24_bitmask(tmp_path, tiny_model_dir):
    train, test = write_text_files(tmp_path)
    export = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "recipes/wanda-50.yaml"),
         "--model.pretrained", str(tiny_model_dir), "--data.train_files", str(train), "--data.eval_files", str(test),
         "--data.seq_len", "32", "--data.num_calibration_samples", "4", "--data.max_eval_windows", "2",
         "--trainer.logger", "false", "--pruning.pattern", "2:4", "--compress_export", "true",
         "--export_dir", str(export)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert _sparsity_config(export).format == "sparse-24-bitmask"
    report = json.loads((export / "pruning_report.json").read_text())
    model = load_pruned(export)
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("_proj.weight"))
    assert zeros >= report["params_pruned"] > 0
