"""Sparse exports in compressed-tensors' bitmask formats (``sparse-bitmask``, ``sparse-24-bitmask`` for 2:4).

Each compressed weight ``<module>.weight`` is stored as the tensors compressed-tensors' ``BitmaskCompressor``
and ``Sparse24BitMaskCompressor`` write (the layout of compressed-tensors <= 0.14, which transformers 4.x and
vLLM's sparse loaders read): ``<module>.compressed`` (the nonzero values; for 2:4 a ``[rows, cols / 2]``
tensor of the two kept values per group of four), ``<module>.bitmask`` (bit-packed, little bit order, one
bit per weight), ``<module>.shape`` and, unstructured only, ``<module>.row_offsets``. ``config.json`` gets
``quantization_config = {"quant_method": "compressed-tensors", "sparsity_config": {...}}``, the config
class's own ``model_dump``.

compressed-tensors 0.15+ (the only versions transformers 5 accepts) removed its sparse compressors
(vllm-project/compressed-tensors#610) and kept the config classes, so the packing and unpacking is done here
with its bitmask helpers, and :func:`mosaic_lightning.load_pruned` decompresses: plain ``from_pretrained`` in
transformers 5 does not (it reports the projection weights missing and initialises them at random).
"""

from __future__ import annotations

import json
import pathlib

import torch
from compressed_tensors import __version__ as ct_version
from compressed_tensors.base import QUANTIZATION_CONFIG_NAME, QUANTIZATION_METHOD_NAME, SPARSITY_CONFIG_NAME
from compressed_tensors.config import (
    BitmaskConfig,
    CompressionFormat,
    Sparse24BitMaskConfig,
    SparsityCompressionConfig,
    SparsityStructure,
)
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
from torch import nn
from transformers.pytorch_utils import Conv1D

MIN_SPARSITY = 0.25  # below this the bitmask (1 bit per weight) plus row offsets would not pay off
FORMATS = (CompressionFormat.sparse_bitmask.value, CompressionFormat.sparse_24_bitmask.value)
_PARTS = ("compressed", "bitmask", "shape", "row_offsets")


def compress_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """``state`` (the weights to save) with every Linear/Conv1D weight of at least ``MIN_SPARSITY`` zeros
    replaced by its bitmask tensors, and the ``quantization_config`` entry that describes them."""
    chosen = _sparse_modules(model, state)
    two_four = bool(chosen) and all(_is_two_four(state[f"{name}.weight"]) for name in chosen)
    out = {k: v for k, v in state.items() if k.removesuffix(".weight") not in chosen}
    for name in chosen:
        weight = state[f"{name}.weight"]
        out.update(_pack_24(name, weight) if two_four else _pack_bitmask(name, weight))
    config_class = Sparse24BitMaskConfig if two_four else BitmaskConfig
    sparsity = config_class(
        targets=sorted({type(model.get_submodule(name)).__name__ for name in chosen}),
        ignore=sorted(_uncompressed_modules(model, chosen)),
        global_sparsity=_zero_fraction(state.values()),
        sparsity_structure=(SparsityStructure.TWO_FOUR if two_four else SparsityStructure.UNSTRUCTURED).value,
    )
    entry = {"version": ct_version, QUANTIZATION_METHOD_NAME: "compressed-tensors",
             SPARSITY_CONFIG_NAME: sparsity.model_dump()}  # fmt: skip
    return out, entry


def write_config_entry(directory: pathlib.Path, entry: dict) -> None:
    """Add ``quantization_config`` to the saved ``config.json``, as compressed-tensors' ``update_config`` does."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config[QUANTIZATION_CONFIG_NAME] = entry
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def sparsity_config(config) -> SparsityCompressionConfig | None:
    """The export's sparsity config (through compressed-tensors' registry), None for a dense export; any other
    compressed-tensors content (quantization) is refused: it is not what :func:`load_pruned` can rebuild."""
    entry = getattr(config, QUANTIZATION_CONFIG_NAME, None)  # AutoConfig keeps it as the JSON dict
    if entry is None:
        return None
    sparsity = entry.get(SPARSITY_CONFIG_NAME) or {}
    if entry.get("config_groups") or sparsity.get("format") not in FORMATS:
        raise ValueError(f"quantization_config: load_pruned reads compressed-tensors sparsity formats {FORMATS} "
                         f"without quantization; this one has format={sparsity.get('format')!r}, "
                         f"config_groups={entry.get('config_groups')!r}")  # fmt: skip
    return SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity)


def decompress_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense weights back from either bitmask layout (``row_offsets`` is not needed to rebuild them)."""
    out = {}
    for key, tensor in state.items():
        prefix, _, part = key.rpartition(".")
        if part == "bitmask":
            shape = state[f"{prefix}.shape"].flatten().tolist()
            values = state[f"{prefix}.compressed"]
            dense = torch.zeros(shape, dtype=values.dtype)
            dense[unpack_bitmasks(tensor, shape)] = values.flatten()
            out[f"{prefix}.weight"] = dense
        elif part not in _PARTS or f"{prefix}.bitmask" not in state:
            out[key] = tensor
    return out


def _sparse_modules(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    chosen = []
    for name, module in model.named_modules():
        weight = state.get(f"{name}.weight")
        compressible = isinstance(module, nn.Linear | Conv1D) and weight is not None and weight.dim() == 2
        if compressible and (weight == 0).sum().item() >= MIN_SPARSITY * weight.numel():
            chosen.append(name)
    return chosen


def _uncompressed_modules(model: nn.Module, chosen: list[str]) -> set[str]:
    """Modules of the targeted classes left dense (e.g. ``lm_head``): compressed-tensors' ``ignore``."""
    classes = tuple({type(model.get_submodule(name)) for name in chosen})
    return {name for name, module in model.named_modules() if classes and type(module) in classes} - set(chosen)


def _is_two_four(weight: torch.Tensor) -> bool:
    return weight.shape[-1] % 4 == 0 and int((weight.reshape(-1, 4) != 0).sum(dim=1).max()) <= 2


def _pack_bitmask(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``BitmaskCompressor``'s tensors: values in row order, packed mask, shape, each row's first value."""
    nonzero = weight != 0
    counts = nonzero.sum(dim=-1)
    return {f"{name}.shape": torch.tensor(weight.shape), f"{name}.compressed": weight[nonzero].contiguous(),
            f"{name}.bitmask": pack_bitmasks(nonzero),
            f"{name}.row_offsets": torch.cumsum(counts, 0) - counts}  # fmt: skip


def _pack_24(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``Sparse24BitMaskCompressor``'s tensors: exactly two values kept per group of four (the two largest
    magnitudes, as its ``get_24_bytemasks``; a group with fewer nonzeros stores a zero), shape as a column."""
    groups = weight.reshape(-1, 4)
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    kept = kept.reshape(weight.shape)
    rows, cols = weight.shape
    return {f"{name}.shape": torch.tensor(weight.shape).reshape(-1, 1),
            f"{name}.compressed": weight[kept].reshape(rows, cols // 2).contiguous(),
            f"{name}.bitmask": pack_bitmasks(kept)}  # fmt: skip


def _zero_fraction(tensors) -> float:
    tensors = list(tensors)
    return sum(int((t == 0).sum()) for t in tensors) / max(1, sum(t.numel() for t in tensors))
