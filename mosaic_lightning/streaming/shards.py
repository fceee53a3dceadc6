"""Models larger than memory: a ``meta`` skeleton, decoder blocks read one at a time from safetensors shards.

What is reused: transformers builds the skeleton (``AutoModelForCausalLM.from_config`` inside accelerate's
``init_empty_weights``: parameters on ``meta``, buffers such as rotary frequencies real), accelerate's
``set_module_tensor_to_device`` puts a tensor into it (cast to the model's dtype, as ``from_pretrained`` casts),
transformers' ``tie_weights`` re-ties the output embedding, and safetensors reads (``safe_open``, memory-mapped:
only the requested tensors are touched) and writes (``save_file``). Ours: which names belong to which block, and
the shard layout of the export, which is transformers' own (``model-00001-of-000NN.safetensors`` plus
``model.safetensors.index.json``), so ``from_pretrained`` loads it.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections import defaultdict

import torch
from torch import nn

from ..core.adapters import ModelAdapter
from ..core.residency import BlockResidency
from ..export.compact import remove_units

INDEX_NAME = "model.safetensors.index.json"


class SafetensorsSource:
    """The tensors of a Hugging Face safetensors directory (one ``model.safetensors`` or shards with an index),
    read on demand. ``bytes_read`` counts what was read."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = pathlib.Path(directory)
        self.files = _tensor_files(self.directory)  # tensor name -> file name
        self.bytes_read = 0

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors as stored (dtype and all), on the CPU; each file opened only for its tensors."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(self.directory / file, framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
                    self.bytes_read += tensors[name].numel() * tensors[name].element_size()
        return tensors


def _tensor_files(directory: pathlib.Path) -> dict[str, str]:
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {missing[:3]}")
        return dict(weight_map)
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"{directory}: streaming reads safetensors weights, and it holds neither {INDEX_NAME} nor "
            "model.safetensors (save the model with save_pretrained(..., safe_serialization=True) first)"
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt", device="cpu") as handle:
        return {name: single.name for name in handle.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)


def meta_skeleton(directory: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``directory``'s config with every parameter on ``meta`` (no weight read or allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)  # no remote code: a model needing it is refused by transformers
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


class StreamedModel:
    """A skeleton and its source: block parameters by layer, the other (resident) tensors, and loading them."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, source: SafetensorsSource) -> None:
        self.model, self.adapter, self.source = model, adapter, source
        prefix = adapter.spec.blocks + "."
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        expected = [n for n in model.state_dict() if n not in tied]
        missing = [n for n in expected if n not in source.files]
        if missing:
            raise ValueError(f"{source.directory} lacks tensors of {type(model).__name__}: {missing[:5]}; streaming "
                             "needs every weight under the names transformers' save_pretrained gives them")  # fmt: skip
        self.block_names: list[list[str]] = [[] for _ in adapter.blocks]
        self.resident_names: list[str] = []
        for name in expected:  # names in the source the model does not have are skipped, as from_pretrained does
            if name.startswith(prefix):
                self.block_names[int(name[len(prefix) :].split(".", 1)[0])].append(name)
            else:
                self.resident_names.append(name)

    def load_resident(self) -> None:
        """Embeddings, final norm and (untied) output embedding into memory; the output embedding re-tied."""
        self._place(self.source.read(self.resident_names), torch.device("cpu"))
        self.model.tie_weights()

    def load_block(self, layer: int, device: torch.device) -> None:
        self._place(self.source.read(self.block_names[layer]), device)

    def free_block(self, layer: int) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in self.block_names[layer]:
            set_module_tensor_to_device(self.model, name, "meta")

    def block_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Block ``layer``'s tensors as they are now, on the CPU, under their checkpoint names."""
        return {name: self._tensor(name).detach().cpu().contiguous() for name in self.block_names[layer]}

    def resident_state(self) -> dict[str, torch.Tensor]:
        return {name: self._tensor(name).detach().cpu().contiguous() for name in self.resident_names}

    def _tensor(self, name: str) -> torch.Tensor:
        module_name, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(module_name), attr)

    def _place(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{self.source.directory}: tensor {name} contains NaN or inf; nothing was exported")
            set_module_tensor_to_device(self.model, name, device, value=tensor)


class ShardWriter:
    """Writes the export one safetensors shard at a time (each written under a temporary name and renamed, so a
    shard is whole or absent), then transformers' index. ``bytes_written`` counts the tensor bytes."""

    def __init__(self, directory: pathlib.Path, num_shards: int) -> None:
        self.directory, self.num_shards = directory, num_shards
        self.bytes_written = 0

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.directory / self.shard_name(index)
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, partial, metadata={"format": "pt"})
        os.replace(partial, path)
        self.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())

    def write_index(self, names_by_shard: list[list[str]]) -> None:
        """The index from the shards' headers (shapes and dtypes only), not from what this writer wrote: after a
        resume, the earlier shards were written by another process."""
        from safetensors import safe_open

        weight_map, total = {}, 0
        for index, names in enumerate(names_by_shard):
            with safe_open(self.directory / self.shard_name(index), framework="pt") as handle:
                for name in names:
                    weight_map[name] = self.shard_name(index)
                    piece = handle.get_slice(name)
                    total += _numel(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]
        index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index_doc, indent=2) + "\n")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class StreamedBlocks(BlockResidency):
    """Each block read from the source shards onto the execution device on ``load``, its pruned tensors written
    to its own output shard by ``save``, and freed (back to ``meta``) on ``unload``: the blocks never all sit in
    memory. A block that lost whole units (composite pruning) is compacted before it is written, so the export is
    the physically smaller model; the skeleton keeps the block's smaller (meta) shapes. ``on_saved(layer,
    next_hidden, rows, plan, structure)`` records progress for a resumable run."""

    commits_each_block = True

    def __init__(self, streamed: StreamedModel, writer: ShardWriter, device=None, on_saved=None) -> None:
        super().__init__(streamed.adapter, device)
        self.streamed, self.writer, self.on_saved = streamed, writer, on_saved
        self.loaded: int | None = None

    @property
    def execution_device(self) -> torch.device:
        return self.device or torch.device("cpu")

    def load(self, layer: int) -> None:
        if self.loaded != layer:
            self.streamed.load_block(layer, self.execution_device)
            self.loaded = layer

    def save(self, layer: int, next_hidden, rows, plan, structure) -> None:
        remove_units(self.adapter, {key: units for key, units in structure.items() if key.startswith(f"{layer}.")})
        self.writer.write(block_shard(layer), self.streamed.block_state(layer))
        if self.on_saved is not None:
            self.on_saved(layer, next_hidden, rows, plan, structure)

    def unload(self, layer: int) -> None:
        if self.loaded == layer:
            self.streamed.free_block(layer)
            self.loaded = None


def block_shard(layer: int) -> int:
    """Shard index of block ``layer`` in the export: shard 0 holds the resident tensors (embeddings, norm)."""
    return layer + 1
