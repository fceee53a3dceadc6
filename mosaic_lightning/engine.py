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
from .methods.wanda import wanda_scores
from .report import ProjectionReport, PruningReport
from .stats import sum_over_ranks
from .structure import (
    UnitGroup,
    choose_removed,
    plan_removals,
    structural_counts,
    structural_keep,
    unit_groups,
    unit_scores,
)
from .zero import full_shape, gathered

# DeepSpeed ZeRO-3 hook points: weights are read and written one module at a time inside ``gathered(module)``
# (a no-op without ZeRO-3); every rank computes the same result from all-reduced statistics.


@dataclass
class _Pending:
    """One block's pruning results, not yet written into the model."""

    keeps: dict[str, torch.Tensor] = field(default_factory=dict)  # projection key -> [out, in] keep mask
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # projection key -> [out, in] changed weight
    removed: dict[str, list[int]] = field(default_factory=dict)  # unit group key -> removed unit indices


@dataclass
class PruningOutcome:
    """Masks by parameter, the report, and the removed units by group key (``"3.mlp"``, ``"3.heads"``)."""

    masks: MaskStore
    report: PruningReport
    structure: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Plan:
    """How much each projection loses: whole units (composite pruning) and then single weights."""

    counts: dict[str, int]  # projection key -> weights pruned in total
    unstructured: dict[str, int]  # projection key -> weights pruned one by one (after units are removed)
    unit_groups: list[UnitGroup] = field(default_factory=list)
    removals: dict[str, int] = field(default_factory=dict)  # unit group key -> units to remove


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
    groups = unit_groups(adapter, config.structured_units) if config.structured else []
    batches = list(calibration_batches)
    report = PruningReport(config=config.to_dict())
    was_training = model.training
    model.eval()
    try:
        clock = time.perf_counter()
        ratios: dict[str, float] = {}
        if allocation.needs_profile:
            by_group = {p.key: allocation.group(p) for p in projections}
            group_ratios = _profile_outliers(model, adapter, batches, by_group, config.outlier_threshold, progress)
            ratios = {p.key: group_ratios[by_group[p.key]] for p in projections}
            report.timings["profile"] = time.perf_counter() - clock
        plan = _plan(adapter, config, allocation, ratios, groups)
        clock = time.perf_counter()
        pending, seconds, tokens = _sequential_prune(
            model, adapter, batches, method, pattern, plan, progress, config.sequential
        )
        report.timings["prune"] = time.perf_counter() - clock
        masks = _commit(adapter, pending)
    finally:
        model.train(was_training)
    report.calibration = {"batches": sum_over_ranks(len(batches)), "tokens": sum_over_ranks(tokens)}  # all ranks
    report.structure = pending.removed
    report.projections = [
        projection_report(
            adapter, p, p.view_of(masks.masks[p.param_name]), plan.counts[p.key],
            plan.counts[p.key] - plan.unstructured[p.key], ratios.get(p.key), seconds.get(p.key, 0.0),
        )  # fmt: skip
        for p in projections
    ]
    report.record_peak_memory("prune")
    return PruningOutcome(masks=masks, report=report, structure=pending.removed)


def _plan(adapter: ModelAdapter, config: PruningConfig, allocation, ratios, groups) -> _Plan:
    """Exact per-projection counts; with structure, units first and single weights fill up to the target."""
    projections = adapter.all_projections()
    group_sparsity = allocation.sparsities(
        {allocation.group(p): ratios.get(p.key, 0.0) for p in projections}, config.sparsity
    )
    base = {p.key: group_sparsity[allocation.group(p)] for p in projections}
    sizes = {p.key: p.numel for p in projections}
    bounds = (0.0, 1.0) if allocation.name == "uniform" else (config.min_sparsity, config.max_sparsity)
    goal = round(config.sparsity * sum(sizes.values()))
    removals: dict[str, int] = {}
    structural: dict[str, int] = {}
    if groups:
        by_layer = {layer: {p.name: p for p in adapter.projections(layer)} for layer in range(adapter.num_layers)}
        target = round(config.structured_fraction * goal)
        removals = plan_removals(groups, by_layer, ratios, target, config.uniform_structure, config.owl_lambda)
        structural = structural_counts(groups, removals, by_layer)
    remaining = {k: n - structural.get(k, 0) for k, n in sizes.items()}
    single = goal - sum(structural.values())
    if single < 0:
        raise ValueError(
            f"structured_fraction={config.structured_fraction}: whole units alone remove more than "
            f"sparsity={config.sparsity}; lower structured_fraction"
        )
    unstructured = exact_counts(remaining, base, config.sparsity, *bounds, goal=single)
    counts = {k: structural.get(k, 0) + unstructured[k] for k in sizes}
    return _Plan(counts, unstructured, groups, removals)


def _profile_outliers(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[torch.Tensor],
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
        for stat in stats.values():
            stat.all_reduce()  # under DDP every rank profiles its own share; all see the sum
        # Outliers are counted on Wanda scores whatever the method (as OWL does for SparseGPT too).
        scores = {}
        for p in adapter.projections(layer):
            with gathered(p.module):
                scores[p.key] = wanda_scores(p.weight_view(), stats[id(p.module)].column_norms)
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


def _sequential_prune(model, adapter, batches, method, pattern, plan: _Plan, progress, sequential: bool = True):
    """Block by block. ``sequential``: block l is calibrated on the output of blocks < l *as pruned* (a second
    pass over each pruned block); otherwise on the dense model's activations (one pass per block, faster)."""
    pending = _Pending()
    seconds: dict[str, float] = {}
    if not method.needs_calibration:  # data-free (magnitude): no forward pass at all
        for layer in range(adapter.num_layers):
            _prune_block(adapter, layer, None, method, pattern, plan, pending, seconds)
        return pending, seconds, 0
    inputs = capture_block_inputs(model, adapter.blocks[0], batches)
    for layer in tqdm(range(adapter.num_layers), desc="pruning blocks", disable=not progress):
        projs = adapter.projections(layer)
        if not projs:
            inputs.hidden = run_block(adapter.blocks[layer], inputs)
            continue
        stats, dense_out = _block_statistics(adapter, layer, inputs, method.needs_hessian, keep_outputs=not sequential)
        for stat in stats.values():
            stat.all_reduce()
        _prune_block(adapter, layer, stats, method, pattern, plan, pending, seconds)
        del stats
        if sequential:
            with swapped_weights(_param_values(projs, pending)):
                inputs.hidden = run_block(adapter.blocks[layer], inputs)
        else:
            inputs.hidden = dense_out
    return pending, seconds, inputs.tokens


def _prune_block(adapter, layer, stats, method, pattern, plan: _Plan, pending: _Pending, seconds) -> None:
    """Remove the block's planned units (lowest importance first), then prune single weights of what is left."""
    projs = {p.name: p for p in adapter.projections(layer)}
    structural: dict[str, torch.Tensor] = {}
    for group in (g for g in plan.unit_groups if g.layer == layer):
        consumer = projs[group.cols[0]]
        norms = stats[id(consumer.module)].column_norms if stats else torch.ones(consumer.in_features)
        with gathered(consumer.module):
            importance = unit_scores(group, projs, norms)
        removed = choose_removed(group, importance, plan.removals[group.key])
        pending.removed[group.key] = removed
        for name in (*group.rows, *group.cols):
            keep = structural_keep(group, removed, projs[name])
            structural[name] = keep if name not in structural else structural[name] & keep
    for name, proj in projs.items():
        clock = time.perf_counter()
        proj_stats = stats[id(proj.module)] if stats else None
        with gathered(proj.module):
            num = plan.unstructured[proj.key]
            result = _prune_projection(proj, proj_stats, method, pattern, num, structural.get(name))
            pending.keeps[proj.key] = result.keep
            if result.weight is not None:  # the method also changed kept weights (SparseGPT)
                pending.weights[proj.key] = result.weight.masked_fill(~result.keep, 0)
        seconds[proj.key] = time.perf_counter() - clock


def _prune_projection(proj, stats, method, pattern, num_prune: int, structural: torch.Tensor | None) -> PruneResult:
    """Prune one projection; with removed units, prune single weights only among the rows/columns kept."""
    weight = proj.weight_view()
    if structural is None:
        return method.prune(weight, stats, pattern, num_prune)
    rows = structural.any(dim=1).nonzero().squeeze(1)
    cols = structural.any(dim=0).nonzero().squeeze(1)
    sub = method.prune(weight[rows][:, cols], stats.select(cols) if stats else None, pattern, num_prune)
    keep = torch.zeros_like(structural)
    keep[rows[:, None], cols[None, :]] = sub.keep
    if sub.weight is None:
        return PruneResult(keep=keep)
    new = torch.zeros_like(weight)
    new[rows[:, None], cols[None, :]] = sub.weight
    return PruneResult(keep=keep, weight=new)


def _param_values(projs: list[Projection], pending: _Pending) -> dict[nn.Parameter, torch.Tensor]:
    """Full parameter tensors with the pending ``[out, in]`` weights written at each projection's place."""
    values: dict[nn.Parameter, torch.Tensor] = {}
    for proj in projs:
        if proj.weight not in values:
            with gathered(proj.module):
                values[proj.weight] = proj.weight.data.clone()
        full = values[proj.weight]
        if proj.key in pending.weights:
            proj.to_param_layout(pending.weights[proj.key], full)
        else:  # mask-only method: the weights as they are, pruned entries zeroed
            proj.view_of(full).masked_fill_(~pending.keeps[proj.key], 0)
    return values


@torch.no_grad()
def _commit(adapter: ModelAdapter, pending: _Pending) -> MaskStore:
    """Write every pending result into the model and build the parameter-level mask store."""
    for proj in adapter.all_projections():
        if proj.key in pending.weights:
            with gathered(proj.module, modify=True):
                proj.weight_view().copy_(pending.weights[proj.key])
    return commit_masks(adapter, pending.keeps)


@torch.no_grad()
def commit_masks(adapter: ModelAdapter, keeps: dict[str, torch.Tensor]) -> MaskStore:
    """Parameter-level mask store from ``[out, in]`` keep masks by projection key, applied to the model.

    Shared by the engine and solvers that choose masks themselves (ADMM), so fused and transposed
    projections (GPT-2's ``c_attn``) are laid out in one place.
    """
    masks = MaskStore()
    full_masks: dict[str, torch.Tensor] = {}
    for proj in adapter.all_projections():
        if proj.param_name not in full_masks:
            shape = full_shape(proj.weight)
            full_masks[proj.param_name] = torch.ones(shape, dtype=torch.bool, device=proj.weight.device)
        mask = full_masks[proj.param_name]
        proj.to_param_layout(keeps[proj.key], mask)
    for name, mask in full_masks.items():
        masks.set(name, mask)
    masks.apply_(adapter.model)
    return masks


def projection_report(
    adapter: ModelAdapter,
    proj: Projection,
    keep: torch.Tensor,
    requested: int,
    structural: int = 0,
    outlier_ratio: float | None = None,
    seconds: float = 0.0,
) -> ProjectionReport:
    """One projection's report row from its ``[out, in]`` keep mask and requested prune count (``structural`` of
    them as whole units). Zeros are counted in the visible weight, gathered under ZeRO-3 (shared with ADMM)."""
    with gathered(proj.module):
        zeros = int((proj.weight_view() == 0).sum())
    return ProjectionReport(
        key=proj.key,
        layer=proj.layer,
        name=proj.name,
        module=adapter.module_name(proj),
        numel=proj.numel,
        requested_sparsity=requested / proj.numel,
        achieved_sparsity=int((~keep).sum()) / proj.numel,
        structured_sparsity=structural / proj.numel,
        zero_fraction=zeros / proj.numel,
        outlier_ratio=outlier_ratio,
        seconds=seconds,
    )
