"""Tensors held in files until they are needed: the pending results of an in-memory pruning run.

An in-memory run writes nothing into the model until every block is pruned (so a failure at block 20 leaves the
model as it was). The blocks' keep masks and, for a method that changes the kept weights (SparseGPT), their new
values must be held somewhere meanwhile: in memory they would add a byte per weight (masks) and the density's
share of the model (values) to the peak, which llm-compressor, writing each block in place, does not pay (see
bench/RESULTS.md, section 'Where pending results wait'). Held here, each tensor is one safetensors file in a
temporary folder (the OS temp dir, ``TMPDIR``; read back at commit, from the page cache at small sizes). Where
that folder is a RAM-backed tmpfs the memory is moved, not saved: point ``TMPDIR`` at a disk.
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Iterator, MutableMapping

import torch
from safetensors.torch import load_file, save_file


class SpilledTensors(MutableMapping[str, torch.Tensor]):
    """Tensors by key, each in its own safetensors file in ``folder``, read back onto the device they were stored
    from; deleting a key deletes its file. The caller owns ``folder`` and its removal."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self._paths: dict[str, pathlib.Path] = {}
        self._devices: dict[str, torch.device] = {}
        self._numbers = itertools.count()

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        path = self._paths.get(key) or self.folder / f"{next(self._numbers)}.safetensors"
        save_file({"tensor": value.detach().cpu().contiguous()}, str(path))
        self._paths[key], self._devices[key] = path, value.device

    def move(self, key: str, device: torch.device) -> None:
        """Read ``key`` back onto ``device`` from now on: the file is in host memory's terms, nothing is copied."""
        self._devices[key] = torch.device(device)

    def __getitem__(self, key: str) -> torch.Tensor:
        return load_file(str(self._paths[key]), device=str(self._devices[key]))["tensor"]

    def __delitem__(self, key: str) -> None:
        self._paths.pop(key).unlink()
        del self._devices[key]

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the file
        return key in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)
