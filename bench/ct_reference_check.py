"""Check ``--compress_export`` against compressed-tensors' own sparse compressors (removed in 0.15, so run this
with an unpacked compressed-tensors <= 0.14 wheel first on ``PYTHONPATH``; not part of the test suite).

    pip download compressed-tensors==0.14.0.1 --no-deps -d /tmp/ct014 && unzip -q /tmp/ct014/*.whl -d /tmp/ct014/src
    PYTHONPATH=/tmp/ct014/src python bench/ct_reference_check.py                   # tiny models, both formats
    PYTHONPATH=/tmp/ct014/src python bench/ct_reference_check.py --export X --dense Y  # a real export pair

For each export: the reference ``ModelCompressor.from_pretrained`` picks its compressor from ``config.json``,
its ``decompress`` must give the dense weights bit for bit, and its ``compress`` of the dense weights must give
the very tensors the export stores.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import compressed_tensors
import torch
from compressed_tensors.compressors import ModelCompressor
from packaging.version import Version
from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))


def check(export: pathlib.Path, dense: dict[str, torch.Tensor]) -> str:
    """Compare one compressed export with the dense weights it came from, through the reference compressor."""
    compressor = ModelCompressor.from_pretrained(str(export)).sparsity_compressor
    stored = load_file(export / "model.safetensors")
    decompressed = dict(compressor.decompress(str(export)))
    for name, value in dense.items():
        if name in decompressed:
            assert torch.equal(decompressed[name].view(torch.uint8), value.view(torch.uint8)), name
    targets = {k.removesuffix(".bitmask") for k in stored if k.endswith(".bitmask")}
    recompressed = compressor.compress({k: v for k, v in dense.items() if k in decompressed}, targets)
    assert recompressed.keys() == stored.keys(), sorted(recompressed.keys() ^ stored.keys())[:5]
    for key, value in recompressed.items():
        assert value.dtype == stored[key].dtype and torch.equal(value, stored[key]), key
    return f"{export}: {type(compressor).__name__}, {len(targets)} weights, decompress and compress identical"


def tiny_exports(folder: pathlib.Path) -> list[tuple[pathlib.Path, dict[str, torch.Tensor]]]:
    from conftest import make_llama, random_batches

    from mosaic_lightning import PruningConfig, prune_model, save_pruned

    pairs = []
    for pattern in ("unstructured", "2:4"):
        model = make_llama()
        prune_model(model, random_batches(), PruningConfig(0.5, "wanda", pattern=pattern), progress=False)
        path = save_pruned(model, None, folder / pattern.replace(":", "of"), compress=True)
        pairs.append((path, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=pathlib.Path, help="a --compress_export directory")
    parser.add_argument("--dense", type=pathlib.Path, help="the same model exported without compression")
    args = parser.parse_args()
    if Version(compressed_tensors.__version__) >= Version("0.15"):
        sys.exit(f"compressed-tensors {compressed_tensors.__version__} has no sparse compressors; see the docstring")
    with tempfile.TemporaryDirectory() as folder:
        pairs = [(args.export, load_file(args.dense / "model.safetensors"))] if args.export else tiny_exports(
            pathlib.Path(folder))  # fmt: skip
        for export, dense in pairs:
            print(check(export, dense))


if __name__ == "__main__":
    main()
