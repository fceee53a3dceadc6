"""What a method or an allocation sees of one decoder block: its inputs and statistics, computed on demand.

The engine streams calibration data block by block (:class:`InputStream`); a :class:`BlockContext` wraps one
block. Nothing is computed until asked for: a data-free method (magnitude) never triggers a forward pass, Wanda
triggers one statistics pass without Hessians, SparseGPT one with them, and a block-level method can ask for
the block's inputs, any submodule's inputs/outputs, or the block's output under candidate weights. So there
are no ``needs_*`` flags to keep in sync with what a method really reads.

Under DeepSpeed ZeRO-3 every rank runs the same requests in the same order (the methods are deterministic),
so the collectives inside forwards and statistic reductions line up; weights are read inside
:meth:`BlockContext.gathered`, one module at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.adapters import ModelAdapter, Projection
from ..core.residency import BlockResidency
from ..core.zero import gathered, is_partitioned
from .capture import BlockInputs, capture_block_inputs, collect_statistics, run_block, swapped_weights
from .stats import InputStatistics
from .true_sequential import TrueSequentialRun

if TYPE_CHECKING:
    from ..core.patterns import Pattern


@dataclass
class PruneResult:
    """``keep``: bool ``[out, in]`` mask. ``weight``: updated weights when the method reconstructs (SparseGPT)."""

    keep: torch.Tensor
    weight: torch.Tensor | None = None


class InputStream:
    """Calibration inputs of one block after another, produced lazily.

    ``sequential``: block ``l`` sees the output of blocks ``< l`` *as pruned* (their pending weights swapped in);
    otherwise the dense model's activations, reusing a block's dense outputs when a statistics pass kept them.
    ``pending_weights(layer)`` gives the full parameter values of a pruned block (None while it is dense).
    ``residency`` puts the activations on the execution device. ``start_layer`` and ``start_hidden``: begin at that
    block with those hidden states (a resumed streamed run), instead of at block 0 with the embeddings.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        batches: Sequence[torch.Tensor],
        sequential: bool,
        pending_weights: Callable[[int], dict[nn.Parameter, torch.Tensor] | None] = lambda layer: None,
        residency: BlockResidency | None = None,
        start_layer: int = 0,
        start_hidden: list[torch.Tensor] | None = None,
    ) -> None:
        self.model, self.adapter, self.batches = model, adapter, batches
        self.sequential, self.pending_weights = sequential, pending_weights
        self.residency = residency or BlockResidency(adapter)
        self.layer = -1  # block whose inputs ``self._inputs`` are
        self._inputs: BlockInputs | None = None
        self._dense_outputs: dict[int, list[torch.Tensor]] = {}
        self._pruned_outputs: dict[int, Callable[[], list[torch.Tensor]]] = {}
        self._start = (start_layer, start_hidden)
        self.tokens = 0

    def inputs(self, layer: int) -> BlockInputs:
        if self._inputs is None:
            self._capture()
        if layer < self.layer:
            raise RuntimeError(f"block {layer}'s inputs were already replaced by block {self.layer}'s")
        while self.layer < layer:
            self._inputs.hidden = self._output_of(self.layer)
            self.layer += 1
            self._inputs.enter(self.layer)
        return self._inputs

    def _capture(self) -> None:
        inputs = capture_block_inputs(self.model, self.adapter.block_list, self.batches)
        inputs.by_layer = self.residency.inputs_to_device(inputs.by_layer)
        start_layer, start_hidden = self._start
        if start_layer and start_hidden is None:
            raise RuntimeError(f"block {start_layer}'s calibration inputs were not saved; cannot continue from there")
        inputs.hidden = self.residency.inputs_to_device(start_hidden if start_hidden is not None else inputs.hidden)
        inputs.enter(start_layer)
        self._inputs, self.layer, self.tokens = inputs, start_layer, inputs.tokens

    def started(self) -> bool:
        """Whether any block's inputs were computed (a data-free method never asks)."""
        return self._inputs is not None

    def finish(self, layer: int) -> list[torch.Tensor] | None:
        """Compute block ``layer``'s output now, while the block is loaded, and return it (the next block's
        inputs); None for the last block and when no calibration data was read so far."""
        if not self.started() or layer + 1 >= self.adapter.num_layers:
            return None
        return self.inputs(layer + 1).hidden

    def keep_dense_outputs(self, layer: int) -> bool:
        """Whether a statistics pass over ``layer`` should keep the block's outputs for the next block."""
        return not self.sequential and layer not in self._dense_outputs

    def offer_dense_outputs(self, layer: int, outputs: list[torch.Tensor]) -> None:
        self._dense_outputs[layer] = outputs

    def offer_pruned_outputs(self, layer: int, produce: Callable[[], list[torch.Tensor]]) -> None:
        """Sequential: ``produce()`` gives block ``layer``'s outputs as pruned (a true-sequential run's last pass),
        called only if the next block's inputs are needed."""
        self._pruned_outputs[layer] = produce

    def _output_of(self, layer: int) -> list[torch.Tensor]:
        block = self.adapter.blocks[layer]
        if not self.sequential:
            dense = self._dense_outputs.pop(layer, None)
            return dense if dense is not None else run_block(block, self._inputs)
        produce = self._pruned_outputs.pop(layer, None)
        if produce is not None:
            return produce()
        weights = self.pending_weights(layer)
        if weights is None:
            return run_block(block, self._inputs)
        with swapped_weights(weights):
            return run_block(block, self._inputs)


class BlockContext:
    """One decoder block while it is pruned (or profiled): its projections, plan and on-demand calibration.

    Attributes:
        layer: block index. projections: its targeted projections, in execution order.
        pattern: the sparsity pattern (None while profiling). num_prune: single weights to prune per projection
            key, after any whole units (structural) are removed.
        true_sequential: every projection's statistics come from its inputs with the projections before it
            already pruned (:mod:`~mosaic_lightning.calibration.true_sequential`); the results of
            :meth:`prune_projection` are run pruned from then on.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        layer: int,
        stream: InputStream | None,
        pattern: Pattern | None = None,
        num_prune: dict[str, int] | None = None,
        true_sequential: bool = False,
    ) -> None:
        self.adapter, self.layer, self.stream = adapter, layer, stream
        self.true_sequential = true_sequential
        self.projections: list[Projection] = adapter.projections(layer)
        self.pattern = pattern
        self.num_prune = num_prune or {}
        self.structural: dict[str, torch.Tensor] = {}  # projection key -> [out, in] keep of the removed units
        self.seconds: dict[str, float] = {}  # projection key -> time spent pruning it (default path)
        self._stats: dict[bool, dict[int, InputStatistics]] = {}
        self._results: dict[str, PruneResult] = {}  # true-sequential: what prune_projection chose so far
        self._staged: TrueSequentialRun | None = None

    @property
    def block(self) -> nn.Module:
        return self.adapter.blocks[self.layer]

    @property
    def inputs(self) -> BlockInputs:
        """The block's calibration inputs (hidden states and other arguments, one entry per batch)."""
        if self.stream is None:
            raise RuntimeError("this method asked for calibration data, but none was given to prune_model")
        return self.stream.inputs(self.layer)

    def gathered(self, *projections: Projection, modify: bool = False) -> AbstractContextManager:
        """Whole weights of these projections' modules for the duration (ZeRO-3; a no-op otherwise)."""
        return gathered(*{id(p.module): p.module for p in projections}.values(), modify=modify)

    # -- statistics ---------------------------------------------------------------------------------------
    def statistics(self, hessian: bool = False) -> dict[int, InputStatistics]:
        """Input statistics of every projection module (by ``id(module)``), summed over ranks; one pass."""
        if self.true_sequential:
            raise RuntimeError("true_sequential: statistics are per projection (input_statistics), not all at once")
        if True in self._stats:
            return self._stats[True]
        if hessian not in self._stats:
            modules = [(self.adapter.module_name(p), p.module) for p in self._unique_modules()]
            keep = self.stream is not None and self.stream.keep_dense_outputs(self.layer)
            stats, outputs = collect_statistics(self.block, modules, self.inputs, hessian, keep_outputs=keep)
            if outputs is not None:
                self.stream.offer_dense_outputs(self.layer, outputs)
            for stat in stats.values():
                stat.all_reduce()  # under DDP every rank calibrates on its own share; all see the sum
            self._stats[hessian] = stats
        return self._stats[hessian]

    def input_statistics(self, proj: Projection, hessian: bool) -> InputStatistics:
        """The statistics of ``proj``'s module, from the block as it entered or, true-sequential, from its
        inputs with the projections before it pruned."""
        if self.true_sequential:
            return self._staged_run().statistics(proj.module, hessian)
        return self.statistics(hessian)[id(proj.module)]

    def stats(self, proj: Projection) -> ProjectionStatistics:
        """The projection's input statistics, computed only when a method reads them."""
        return ProjectionStatistics(self, proj)

    def pruned_outputs(self) -> Callable[[], list[torch.Tensor]] | None:
        """True-sequential, once the block is pruned: computes the block's outputs in the staged run's last pass
        (the next block's inputs). None when no statistics were read (nothing to share)."""
        return None if self._staged is None else self._staged.outputs

    def _staged_run(self) -> TrueSequentialRun:
        if self._staged is None:
            modules = [(self.adapter.module_name(p), p.module) for p in self._unique_modules()]
            self._staged = TrueSequentialRun(self.block, modules, self.inputs)
            for proj in self._unique_modules():
                self._offer_pruned(proj)
        return self._staged

    def _offer_pruned(self, proj: Projection) -> None:
        """Once all projections of ``proj``'s module have results, the staged run runs the module pruned."""
        parts = [p for p in self.projections if p.module is proj.module]
        if self._staged is not None and all(p.key in self._results for p in parts):
            values = parameter_values(parts, lambda part, view: write_result(view, self._results[part.key]))
            self._staged.set_pruned(proj.module, values)

    def _unique_modules(self) -> list[Projection]:
        return list({id(p.module): p for p in self.projections}.values())

    # -- running the block ----------------------------------------------------------------------------------
    def capture(self, modules: dict[str, nn.Module]) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Run the block (its current weights) over the calibration inputs and return, for every named
        submodule, its first positional input and its output per batch."""
        seen: dict[str, tuple[list, list]] = {name: ([], []) for name in modules}
        handles = [m.register_forward_hook(_io_recorder(seen[name])) for name, m in modules.items()]
        try:
            run_block(self.block, self.inputs)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def run(self, weights: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The block's outputs, optionally with ``[out, in]`` weights (by projection key) swapped in."""
        if not weights:
            return run_block(self.block, self.inputs)
        changed = [p for p in self.projections if p.key in weights]
        values = parameter_values(changed, lambda proj, view: view.copy_(weights[proj.key]))
        with swapped_weights(values):
            return run_block(self.block, self.inputs)

    # -- the default per-projection path -------------------------------------------------------------------
    def prune_projection(
        self,
        proj: Projection,
        prune: Callable[[torch.Tensor, ProjectionStatistics, Pattern, int], PruneResult],
    ) -> PruneResult:
        """``prune(weight, stats, pattern, num_prune)`` on one projection, inside its gather; with removed units,
        only among the rows and columns they leave (the result is laid out over the whole projection)."""
        clock = time.perf_counter()
        with self.gathered(proj):
            weight, stats = proj.weight_view(), self.stats(proj)
            structural = self.structural.get(proj.key)
            num = self.num_prune[proj.key]
            if structural is None:
                result = prune(weight, stats, self.pattern.for_count(*weight.shape, num), num)
            else:
                rows = structural.any(dim=1).nonzero().squeeze(1)
                cols = structural.any(dim=0).nonzero().squeeze(1)
                sub = prune(weight[rows][:, cols], stats.select(cols), self.pattern, num)
                keep = torch.zeros_like(structural)
                keep[rows[:, None], cols[None, :]] = sub.keep
                new = None
                if sub.weight is not None:
                    new = torch.zeros_like(weight)
                    new[rows[:, None], cols[None, :]] = sub.weight
                result = PruneResult(keep=keep, weight=new)
        self.seconds[proj.key] = time.perf_counter() - clock
        if self.true_sequential:
            self._results[proj.key] = result
            self._offer_pruned(proj)
        return result


class ProjectionStatistics:
    """Lazy view of one projection's input statistics (optionally of a subset of its input columns).

    Reading ``column_norms`` runs the block's statistics pass (without Hessians) the first time; reading
    ``hessian`` runs it with Hessians. Methods that read neither (magnitude) cost no forward pass.
    """

    def __init__(self, block: BlockContext, proj: Projection, columns: torch.Tensor | None = None) -> None:
        self._block, self._proj, self._columns = block, proj, columns

    def _entry(self, hessian: bool) -> InputStatistics:
        entry = self._block.input_statistics(self._proj, hessian)
        return entry if self._columns is None else entry.select(self._columns)

    @property
    def column_norms(self) -> torch.Tensor:
        """``||X_j||_2`` over every calibration token (all ranks), float32."""
        return self._entry(hessian=False).column_norms

    @property
    def hessian(self) -> torch.Tensor:
        """``X X^T / tokens``, float32."""
        return self._entry(hessian=True).hessian

    @property
    def tokens(self) -> int:
        return self._entry(hessian=False).tokens

    def select(self, columns: torch.Tensor) -> ProjectionStatistics:
        """Statistics of a subset of input columns (the ones removed units leave)."""
        if self._columns is not None:
            columns = self._columns[columns]
        return ProjectionStatistics(self._block, self._proj, columns)


def parameter_values(
    projections: Sequence[Projection], edit: Callable[[Projection, torch.Tensor], None]
) -> dict[nn.Parameter, torch.Tensor]:
    """Whole copies of the projections' parameters (gathered under ZeRO-3; one copy per parameter, so a fused
    module's parts share it), with ``edit(proj, view)`` applied in place to each projection's ``[out, in]`` view:
    the values to swap in (``swapped_weights``) to run a block as pruned or under candidate weights."""
    values: dict[nn.Parameter, torch.Tensor] = {}
    for proj in projections:
        if proj.weight not in values:
            with gathered(proj.module):
                values[proj.weight] = proj.weight.data.clone()
        edit(proj, proj.view_of(values[proj.weight]))
    return values


@contextmanager
def edited_weights(projections: Sequence[Projection], edit: Callable[[Projection, torch.Tensor], None]):
    """Run with ``edit(proj, view)`` applied in place to every projection's ``[out, in]`` weights, restored exactly
    on exit: for whole-model runs under candidate weights (a search's fitness).

    Modules are edited one at a time (under ZeRO-3 inside a gather of that module alone, every rank writing the
    same, rank 0's values re-partitioned). What is held meanwhile is each edited parameter's original value:
    the whole tensor, or under ZeRO-3 only this rank's partition, which is also what the restore writes back,
    so the whole model is never gathered on one rank.
    """
    by_module: dict[nn.Module, list[Projection]] = {}
    for proj in projections:
        by_module.setdefault(proj.module, []).append(proj)
    saved: dict[nn.Parameter, torch.Tensor] = {}
    try:
        for module, parts in by_module.items():
            for param in {id(p.weight): p.weight for p in parts}.values():
                saved[param] = _local_values(param).detach().clone()
            with gathered(module, modify=True), torch.no_grad():
                for proj in parts:
                    edit(proj, proj.view_of(proj.weight.data))
        yield
    finally:
        with torch.no_grad():
            for param, value in saved.items():
                _local_values(param).copy_(value)


def _local_values(param: nn.Parameter) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return param.ds_tensor.data if is_partitioned(param) else param.data


def write_result(view: torch.Tensor, result: PruneResult) -> None:
    """A projection's ``[out, in]`` values as pruned: the method's new weights, or the weights as they are,
    pruned entries zero either way."""
    if result.weight is not None:
        view.copy_(result.weight.masked_fill(~result.keep, 0))
    else:
        view.masked_fill_(~result.keep, 0)


def _io_recorder(store: tuple[list, list]) -> Callable:
    def hook(_module, args, output):
        store[0].append(args[0].detach() if args else None)
        store[1].append((output[0] if isinstance(output, tuple) else output).detach())

    return hook
