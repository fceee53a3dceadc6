"""*Where a block lives while it is worked on*: the execution device, separate from where the model is stored.

The engine (and an allocation's profile pass) brackets its work on block ``l`` with ``load(l)`` and ``unload(l)``.
:class:`BlockResidency` moves the block to the execution device for the duration (and back), so a model held in
CPU memory is calibrated and pruned one block at a time on a GPU; the calibration activations live on that
device too (:meth:`inputs_to_device`). :class:`~mosaic_lightning.streaming.shards.StreamedBlocks` goes further:
blocks are read from safetensors shards on ``load`` and written out and freed on ``unload``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapters import ModelAdapter


class BlockResidency:
    """Blocks move to ``device`` while they are worked on and back to where they were after (no-op for None).

    ``commits_each_block``: the engine writes each block's result into it when the block is done (before
    ``unload``), instead of all blocks at the end; set by residencies that let a block go after ``unload``.
    """

    commits_each_block = False

    def __init__(self, adapter: ModelAdapter, device: str | torch.device | None = None) -> None:
        self.adapter = adapter
        self.device = None if device is None else torch.device(device)
        self._home: dict[int, torch.device] = {}

    def load(self, layer: int) -> None:
        if self.device is None:
            return
        block = self.adapter.blocks[layer]
        self._home[layer] = next(block.parameters()).device
        block.to(self.device, non_blocking=True)  # host -> device: ordered on the stream, the host need not wait

    def unload(self, layer: int) -> None:
        # device -> host stays blocking: the host reads these weights next (commit, export), so it must wait for
        # the copy anyway; this is the block loop's one intended synchronisation.
        if layer in self._home:
            self.adapter.blocks[layer].to(self._home.pop(layer))

    def save(self, layer: int, next_hidden: list[torch.Tensor] | None, rows: list, plan,
             structure: dict[str, list[int]]) -> None:  # fmt: skip
        """Called, with ``commits_each_block``, once block ``layer`` holds its result: with the next block's
        calibration inputs (None if none were computed), the report rows so far, the engine's ``Plan`` and the
        units removed so far (``{"3.mlp": [channels]}``), for a resumable run."""

    def inputs_to_device(self, value):
        """``value`` (a tensor, or tuples/lists/dicts of them, as a block's arguments are) on the device."""
        return value if self.device is None else move_tensors(value, lambda t: t.to(self.device, non_blocking=True))


def move_tensors(value, move: Callable[[torch.Tensor], torch.Tensor]):
    """``move`` applied to every tensor inside nested tuples, lists and dicts."""
    if torch.is_tensor(value):
        return move(value)
    if isinstance(value, tuple | list):
        return type(value)(move_tensors(v, move) for v in value)
    if isinstance(value, dict):
        return {k: move_tensors(v, move) for k, v in value.items()}
    return value
