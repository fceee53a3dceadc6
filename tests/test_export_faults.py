"""Exports that are edited after the fact, or that cannot be written: ``load_pruned`` checks the
per-layer shapes in config.json against the weight files and names the layer and field; a disk that fills up
while exporting leaves no final directory, no temp directory, and says so."""

from __future__ import annotations

import errno
import json

import pytest
import transformers.modeling_utils
from conftest import make_llama, random_batches

from mosaic_lightning import PruningConfig, compact_model, load_pruned, prune_model, save_pruned
from mosaic_lightning.core.report import PruningReport


@pytest.fixture
def per_layer_export(tmp_path):
    """A composite-pruned tiny Llama, compacted with sizes that differ per layer (config holds them)."""
    model = make_llama()
    config = PruningConfig(sparsity=0.5, allocation="mosaic", structured_fraction=0.6)
    compact_model(model, prune_model(model, random_batches(), config, progress=False).structure)
    save_pruned(model, None, tmp_path / "out")
    shapes = json.loads((tmp_path / "out/config.json").read_text())["mosaic_layer_shapes"]
    assert len({s["mlp"] for s in shapes}) > 1 and {s["heads"] for s in shapes} != {4}
    return tmp_path / "out"


def _edit_shapes(export, edit) -> None:
    config = json.loads((export / "config.json").read_text())
    edit(config["mosaic_layer_shapes"])
    (export / "config.json").write_text(json.dumps(config))


def _set(layer: int, field: str, value):
    return lambda shapes: shapes[layer].__setitem__(field, value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda shapes: shapes.pop(), r"mosaic_layer_shapes has 1 entries; expected a list of one per layer \(2\)"),
        (_set(1, "mlp", -3), r"mosaic_layer_shapes\[1\]\.mlp = -3; allowed values: integers in \[1, 128\]"),
        (_set(0, "mlp", 500), r"mosaic_layer_shapes\[0\]\.mlp = 500; allowed values: integers in \[1, 128\]"),
        (_set(0, "heads", 3), r"mosaic_layer_shapes\[0\]\.heads = 3; .* divisible by 2 \(key/value heads\)"),
        (_set(1, "heads", "4"), r"mosaic_layer_shapes\[1\]\.heads = '4'"),
        (_set(1, "experts", 2), r"mosaic_layer_shapes\[1\] = .*expected a mapping of \['heads', 'mlp'\]"),
        (lambda shapes: shapes.__setitem__(0, 7), r"mosaic_layer_shapes\[0\] = 7"),
        (lambda shapes: shapes.reverse(), r"is \[\d+, 64\] in the weight files, but mosaic_layer_shapes\[\d\]\.\w+"),
    ],
    ids=["truncated", "negative", "too large", "heads not per kv group", "not an int", "unknown unit", "not a dict",
         "valid but not these weights"],
)  # fmt: skip
def test_load_pruned_names_the_layer_and_field_of_a_bad_shape(per_layer_export, edit, message):
    _edit_shapes(per_layer_export, edit)
    weights = (per_layer_export / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=message) as caught:
        load_pruned(per_layer_export)
    assert "config.json" in str(caught.value)
    assert (per_layer_export / "model.safetensors").read_bytes() == weights


def test_disk_full_during_export_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")  # what a writer leaves behind before the disk runs out
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    export = tmp_path / "new_parent" / "pruned"
    with pytest.raises(OSError, match=r"export_dir=.*pruned'?: the disk filled up while writing the export") as caught:
        save_pruned(make_llama(), None, export, PruningReport(config={"sparsity": 0.5}))
    assert caught.value.errno == errno.ENOSPC
    assert "Free space on" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no final directory, no temp directory, not even the parent it made
