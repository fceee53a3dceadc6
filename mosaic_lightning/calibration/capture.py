"""Layer-streamed calibration: run calibration batches through one decoder block at a time.

Only the hidden states entering the current block are held (one tensor per batch), so peak memory is one
block plus its activations, never the whole model's. Every block's own other arguments (attention mask,
rotary embeddings, ...; they differ between blocks in Gemma 2/3) are captured once from the model's own forward
with the blocks stood in for (:func:`capture_block_inputs`), which keeps this architecture-generic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.zero import full_shape, gathered_params, is_partitioned
from .stats import InputStatistics, NonFiniteActivationError, check_finite


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once everything needed has been seen."""


@dataclass
class BlockInputs:
    """What one block receives for every calibration batch: hidden states plus its other arguments.

    ``by_layer`` holds every block's own other arguments (``args``, ``kwargs`` per batch): they differ between
    blocks in some families (Gemma 2/3: sliding-window masks and local rotary embeddings on some layers, global
    ones on the others), so block ``l`` must never be run with block 0's. :meth:`enter` selects a block's.
    """

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    by_layer: list[tuple[list[tuple], list[dict]]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def enter(self, layer: int) -> None:
        """Take block ``layer``'s own arguments (the hidden states are the caller's to replace)."""
        self.args, self.kwargs = self.by_layer[layer]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Iterable[torch.Tensor]) -> BlockInputs:
    """Run the model's embeddings for each batch of ``input_ids``: keep the hidden states entering the first
    block and every block's other arguments, as the model's own forward passes them.

    For the duration every entry of ``blocks`` (the model's ModuleList) is replaced by a recorder that returns its
    input unchanged, and the last one ends the pass: no block computes, its hooks do not fire (under ZeRO-3 no
    block is gathered), the head never runs, and blocks that are not loaded (streamed from disk) are fine.
    """
    captured = BlockInputs([], [], [], [([], []) for _ in blocks])
    recorders = [_ArgumentRecorder(layer, captured, last=layer == len(blocks) - 1) for layer in range(len(blocks))]
    device = model.get_input_embeddings().weight.device
    with blocks_replaced(blocks, recorders):
        for input_ids in batches:
            with suppress(StopForward):
                model(input_ids=input_ids.to(device), use_cache=False)
    if not captured.hidden:
        raise ValueError("calibration set is empty: calibration_batches/dataloader yielded no batch")
    if not bool(torch.stack([torch.isfinite(h).all() for h in captured.hidden]).all()):  # one host sync
        raise NonFiniteActivationError("embeddings of the calibration batches contain NaN or inf")
    captured.enter(0)
    return captured


@contextmanager
def blocks_replaced(blocks: nn.ModuleList, stand_ins: Sequence[nn.Module]):
    """Every entry of the model's ``blocks`` replaced by its stand-in for the duration, then restored: runs the
    model's own forward around the blocks (embeddings, masks, final norm) without computing them."""
    originals = list(blocks)
    for layer, stand_in in enumerate(stand_ins):
        blocks[layer] = stand_in
    try:
        yield
    finally:
        for layer, block in enumerate(originals):
            blocks[layer] = block


class _ArgumentRecorder(nn.Module):
    """Stands in for block ``layer`` while its arguments are captured (see :func:`capture_block_inputs`)."""

    def __init__(self, layer: int, captured: BlockInputs, last: bool) -> None:
        super().__init__()
        self.layer, self.captured, self.last = layer, captured, last

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        if self.layer == 0:
            self.captured.hidden.append(hidden)
        self.captured.by_layer[self.layer][0].append(rest)
        self.captured.by_layer[self.layer][1].append(kwargs)
        if self.last:
            raise StopForward
        return hidden


def first_output(out):
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's output hidden states for every batch."""
    return [first_output(block(h, *a, **k)) for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True)]


@torch.no_grad()
def collect_statistics(
    block: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    inputs: BlockInputs,
    hessian: bool,
    keep_outputs: bool = False,
) -> tuple[dict[int, InputStatistics], list[torch.Tensor] | None]:
    """Statistics of the inputs of ``modules`` (keyed by ``id(module)``) from one pass over the block.

    Without ``keep_outputs`` the pass stops right after the last module's inputs are seen: its matmul and
    the rest of the block are not needed for statistics. With it, the block's outputs are returned too.
    """
    stats = {}
    handles = []
    last: dict = {}  # the latest input and its contribution, shared by modules fed the same tensor
    for name, module in modules:
        entry = InputStatistics(name, in_features(module), hessian, device=module.weight.device)
        stats[id(module)] = entry
        handles.append(module.register_forward_pre_hook(_recorder(entry, last)))
    # Under DeepSpeed ZeRO-3 an exception inside the block would leave the last module's gathered parameters
    # marked in use by DeepSpeed's hooks, so the block runs to its end there.
    if not keep_outputs and not any(is_partitioned(p) for p in block.parameters()):
        handles.append(modules[-1][1].register_forward_pre_hook(_stop))
    outputs = []
    try:
        for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
            with suppress(StopForward):
                outputs.append(first_output(block(h, *a, **k)))
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    check_finite(stats.values())
    return stats, (outputs if keep_outputs else None)


def in_features(module: nn.Module) -> int:
    return _out_in(module)[1]


def out_features(module: nn.Module) -> int:
    return _out_in(module)[0]


def _out_in(module: nn.Module) -> tuple[int, int]:
    # GPT-2's Conv1D stores its weight as [in, out].
    shape = full_shape(module.weight)  # the real shape also under ZeRO-3
    return (shape[1], shape[0]) if type(module).__name__ == "Conv1D" else (shape[0], shape[1])


def _recorder(entry: InputStatistics, last: dict) -> Callable:
    """A pre-hook adding the module's input to ``entry``. q/k/v (and gate/up) receive the very same tensor, so its
    contribution is computed once and reused while that tensor object is the latest input (held in ``last``,
    so its memory cannot be reused by another tensor in the meantime)."""

    def hook(_module, args):
        x = args[0]
        if last.get("input") is not x:
            last["input"], last["part"] = x, entry.contribution(x)
        entry.add(last["part"])

    return hook


def _stop(_module, _args):
    raise StopForward


@contextmanager
def swapped_weights(new_weights: dict[nn.Parameter, torch.Tensor]):
    """Temporarily replace parameter values (to run a block as pruned) and restore the originals after.

    Under DeepSpeed ZeRO-3 the values are written inside a gather of just these parameters (every rank writes
    the same; rank 0's are re-partitioned), and the block then runs through DeepSpeed's own hooks.
    """
    if not any(is_partitioned(p) for p in new_weights):  # whole tensors: swap storage, copy nothing
        saved = {p: p.data for p in new_weights}
        try:
            for p, value in new_weights.items():
                p.data = value
            yield
        finally:
            for p, value in saved.items():
                p.data = value
        return
    saved: dict[nn.Parameter, torch.Tensor] = {}
    try:
        with gathered_params(new_weights, modify=True), torch.no_grad():
            saved = {p: p.data.clone() for p in new_weights}
            for p, value in new_weights.items():
                p.data.copy_(value)
        yield
    finally:
        with gathered_params(saved, modify=True), torch.no_grad():
            for p, value in saved.items():
                p.data.copy_(value)
