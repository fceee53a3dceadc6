"""The pruning engine: calibrate, allocate, prune, commit. Plain PyTorch; the callbacks are thin glue over it.

Sequence (as Wanda/SparseGPT's sequential mode): block ``l`` is calibrated on the output of blocks ``< l``
*as pruned*. Nothing is written into the model until every block has been processed: each block's result is
held as pending masks (and, for SparseGPT, updated weights), the block is run with them swapped in to feed the
next block, and only then are all results committed. So a bad input found at block 20 (NaN activations, say)
raises with the model exactly as it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter, Projection
from .allocation import exact_counts, outlier_ratios
from .calibration import BlockInputs, capture_block_inputs, collect_statistics, run_block, swapped_weights
from .config import PruningConfig
from .masks import MaskStore
from .methods import PruneResult
from .report import ProjectionReport, PruningReport


@dataclass
class _Pending:
    """One block's pruning results, not yet written into the model."""

    keeps: dict[str, torch.Tensor] = field(default_factory=dict)  # projection key -> [out, in] keep mask
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # projection key -> [out, in] new weight


@dataclass
class PruningOutcome:
    masks: MaskStore
    report: PruningReport


def prune_model(
    model: nn.Module,
    calibration_batches: Iterable[torch.Tensor],
    config: PruningConfig,
    adapter: ModelAdapter | None = None,
    progress: bool = True,
) -> PruningOutcome:
    """Prune ``model`` in place from ``calibration_batches`` (tensors of ``input_ids``)."""
    adapter = adapter or ModelAdapter(model, targets=config.targets, exclude=config.exclude)
    pattern, method, allocation = config.build_pattern(), config.build_method(), config.build_allocation()
    projections = adapter.all_projections()
    for proj in projections:
        pattern.check_shape(proj.in_features, adapter.module_name(proj))
    batches = [b for b in calibration_batches]
    report = PruningReport(config=config.to_dict())
    was_training = model.training
    model.eval()
    try:
        clock = time.perf_counter()
        ratios: dict[str, float] = {}
        if allocation.needs_profile:
            groups = {p.key: allocation.group(p) for p in projections}
            ratios = _profile_outliers(
                model, adapter, batches, method, groups, config.outlier_threshold, progress
            )
            report.timings["profile"] = time.perf_counter() - clock
        group_sparsity = allocation.sparsities(ratios or {p.key: 0.0 for p in projections}, config.sparsity)
        per_projection = {p.key: group_sparsity[allocation.group(p)] for p in projections}
        sizes = {p.key: p.numel for p in projections}
        bounds = (0.0, 1.0) if allocation.name == "uniform" else (config.min_sparsity, config.max_sparsity)
        counts = exact_counts(sizes, per_projection, config.sparsity, *bounds)

        clock = time.perf_counter()
        pending, seconds, tokens = _sequential_prune(
            model, adapter, batches, method, pattern, counts, progress
        )
        report.timings["prune"] = time.perf_counter() - clock
        masks = _commit(adapter, pending)
    finally:
        model.train(was_training)
    report.calibration = {"batches": len(batches), "tokens": tokens}
    projection_ratios = {p.key: ratios[allocation.group(p)] for p in projections} if ratios else {}
    report.projections = [
        _projection_report(adapter, p, counts, projection_ratios, seconds) for p in projections
    ]
    report.record_peak_memory("prune")
    return PruningOutcome(masks=masks, report=report)


def _profile_outliers(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[torch.Tensor],
    method,
    groups: dict[str, str],
    threshold: float,
    progress: bool,
) -> dict[str, float]:
    """Outlier ratio per group on the dense model: one stats-collecting forward per block."""
    inputs = capture_block_inputs(model, adapter.blocks[0], batches)
    ratios: dict[str, float] = {}
    for layer in tqdm(range(adapter.num_layers), desc="outlier profile", disable=not progress):
        # Profiling runs the dense model, so one full pass gives both statistics and the next block's inputs.
        stats, inputs.hidden = _block_statistics(adapter, layer, inputs, hessian=False, keep_outputs=True)
        scores = {
            p.key: method.scores(p.weight_view(), stats[id(p.module)]) for p in adapter.projections(layer)
        }
        ratios.update(outlier_ratios(scores, {k: groups[k] for k in scores}, threshold))
    return ratios


def _block_statistics(
    adapter: ModelAdapter, layer: int, inputs: BlockInputs, hessian: bool, keep_outputs: bool
):
    modules = [(_module_name(adapter, layer, m), m) for m in adapter.projection_modules(layer)]
    return collect_statistics(adapter.blocks[layer], modules, inputs, hessian, keep_outputs)


def _module_name(adapter: ModelAdapter, layer: int, module: nn.Module) -> str:
    for p in adapter.projections(layer):
        if p.module is module:
            return adapter.module_name(p)
    raise KeyError(module)


def _sequential_prune(model, adapter, batches, method, pattern, counts, progress):
    if not method.needs_calibration:
        return _prune_without_data(adapter, method, pattern, counts)
    inputs = capture_block_inputs(model, adapter.blocks[0], batches)
    tokens = inputs.tokens
    pending = _Pending()
    seconds: dict[str, float] = {}
    for layer in tqdm(range(adapter.num_layers), desc="pruning blocks", disable=not progress):
        projs = adapter.projections(layer)
        if not projs:
            inputs.hidden = run_block(adapter.blocks[layer], inputs)
            continue
        stats, _ = _block_statistics(adapter, layer, inputs, method.needs_hessian, keep_outputs=False)
        for stat in stats.values():
            stat.all_reduce()
        for proj in projs:
            clock = time.perf_counter()
            result: PruneResult = method.prune(
                proj.weight_view(), stats[id(proj.module)], pattern, counts[proj.key]
            )
            pending.keeps[proj.key] = result.keep
            pruned = result.weight if result.weight is not None else proj.weight_view()
            pending.weights[proj.key] = pruned.masked_fill(~result.keep, 0)
            seconds[proj.key] = time.perf_counter() - clock
        del stats
        with swapped_weights(_param_values(projs, pending)):
            inputs.hidden = run_block(adapter.blocks[layer], inputs)
        _drop_weights(projs, pending)
    return pending, seconds, tokens


def _prune_without_data(adapter, method, pattern, counts):
    """Data-free methods (magnitude): no forward pass at all."""
    pending = _Pending()
    seconds: dict[str, float] = {}
    for proj in adapter.all_projections():
        clock = time.perf_counter()
        pending.keeps[proj.key] = method.prune(proj.weight_view(), None, pattern, counts[proj.key]).keep
        seconds[proj.key] = time.perf_counter() - clock
    return pending, seconds, 0


def _param_values(projs: list[Projection], pending: _Pending) -> dict[nn.Parameter, torch.Tensor]:
    """Full parameter tensors with the pending ``[out, in]`` weights written at each projection's place."""
    values: dict[nn.Parameter, torch.Tensor] = {}
    for proj in projs:
        full = values.setdefault(proj.weight, proj.weight.data.clone())
        proj.to_param_layout(pending.weights[proj.key], full)
    return values


def _drop_weights(projs: list[Projection], pending: _Pending) -> None:
    """Keep only what commit needs: masks always, new weights only when the method changed kept weights."""
    for proj in projs:
        new = pending.weights[proj.key]
        if torch.equal(new, proj.weight_view().masked_fill(~pending.keeps[proj.key], 0)):
            del pending.weights[proj.key]


@torch.no_grad()
def _commit(adapter: ModelAdapter, pending: _Pending) -> MaskStore:
    """Write every pending result into the model and build the parameter-level mask store."""
    masks = MaskStore()
    full_masks: dict[str, torch.Tensor] = {}
    for proj in adapter.all_projections():
        keep = pending.keeps[proj.key]
        if proj.key in pending.weights:
            proj.weight_view().copy_(pending.weights[proj.key])
        mask = full_masks.setdefault(proj.param_name, torch.ones_like(proj.weight, dtype=torch.bool))
        proj.to_param_layout(keep, mask)
    for name, mask in full_masks.items():
        masks.set(name, mask)
    masks.apply_(adapter.model)
    return masks


def _projection_report(adapter, proj: Projection, counts, ratios, seconds) -> ProjectionReport:
    zeros = int((proj.weight_view() == 0).sum())
    return ProjectionReport(
        key=proj.key,
        layer=proj.layer,
        name=proj.name,
        module=adapter.module_name(proj),
        numel=proj.numel,
        requested_sparsity=counts[proj.key] / proj.numel,
        achieved_sparsity=zeros / proj.numel,
        outlier_ratio=ratios.get(proj.key),
        seconds=seconds.get(proj.key, 0.0),
    )
