"""The pruning engine: allocate, plan, prune block by block, commit. Plain PyTorch; the callbacks are thin glue.

Sequence (as Wanda/SparseGPT's sequential mode): block ``l`` is calibrated on the output of blocks ``< l``
*as pruned*. Each block is handed to the method as a
:class:`~mosaic_lightning.calibration.block.BlockContext` that computes calibration data only when the method reads it.
Nothing is written into the model until every block has been processed: each block's result is held as pending masks
(and, for reconstructing methods, the new values of the kept weights), in files in a temporary folder
(:mod:`~mosaic_lightning.pruning.spill`), the block runs with them swapped in to feed the next block, and only then are
all results committed. So a bad input found at block 20 (NaN activations, say) raises with the model exactly as it was,
at no memory cost until the commit.

Where a block is worked on is a :class:`~mosaic_lightning.core.residency.BlockResidency`: in place, on an execution
device, or streamed from the source shards (:mod:`mosaic_lightning.streaming.shards`). A streamed block is committed and
written out as soon as the next block's inputs are computed from it (the source files are never changed).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tempfile
import time
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation import AllocationContext, Budget, count_quanta, exact_counts
from ..calibration.block import BlockContext, InputStream, PruneResult, parameter_values
from ..calibration.stats import sum_over_ranks
from ..core.adapters import ModelAdapter, Projection
from ..core.masks import MaskStore
from ..core.report import ProjectionReport, PruningReport
from ..core.residency import BlockResidency
from ..core.structure import (
    UnitGroup,
    check_removals,
    plan_removals,
    round_up_to_whole_units,
    statable_head_counts,
    structural_counts,
    structural_keep,
    unit_groups,
)
from ..core.zero import full_shape, gathered
from .config import PruningConfig
from .spill import SpilledTensors

# DeepSpeed ZeRO-3 hook points: weights are read and written one module at a time inside ``gathered(module)``
# (a no-op without ZeRO-3); every rank computes the same result from all-reduced statistics.


@dataclass
class _Pending:
    """Pruning results, not yet written into the model."""

    keeps: MutableMapping[str, torch.Tensor] = field(default_factory=dict)  # projection key -> [out, in] keep
    weights: MutableMapping[str, torch.Tensor] = field(default_factory=dict)  # key -> new kept values, 1-D
    removed: dict[str, list[int]] = field(default_factory=dict)  # unit group key -> removed unit indices


@dataclass(frozen=True)
class PruningOutcome:
    """One pruning's result, passed on and never edited: masks by parameter, the report (which goes on collecting
    the run's metrics), the removed units by group key (``"3.mlp"``, ``"3.heads"``), and whether those units are
    already compacted away in the live model (a new outcome says so: ``dataclasses.replace``)."""

    masks: MaskStore
    report: PruningReport | None
    structure: dict[str, list[int]] = field(default_factory=dict)
    compacted: bool = False


@dataclass
class Plan:
    """How much each projection loses: whole units (composite pruning) and then single weights."""

    counts: dict[str, int]  # projection key -> weights pruned in total
    unstructured: dict[str, int]  # projection key -> weights pruned one by one (after units are removed)
    ratios: dict[str, float] = field(default_factory=dict)  # the allocation's per-projection signal (report)
    unit_groups: list[UnitGroup] = field(default_factory=list)
    removals: dict[str, int] = field(default_factory=dict)  # unit group key -> units to remove
    allocation: dict = field(default_factory=dict)  # what the allocation measured or searched (report)
    size: dict = field(default_factory=dict)  # parameters before and after compaction, for whole-unit plans

    def to_dict(self) -> dict:
        """What a resumable streamed run saves (JSON): all but the unit groups, which follow from the model and
        the config (``Plan(**saved, unit_groups=unit_groups(adapter, config.structured_units))`` restores it)."""
        return {"counts": self.counts, "unstructured": self.unstructured, "ratios": self.ratios,
                "removals": self.removals, "allocation": self.allocation, "size": self.size}  # fmt: skip


def prune_model(
    model: nn.Module,
    calibration_batches: Iterable[torch.Tensor],
    config: PruningConfig,
    adapter: ModelAdapter | None = None,
    progress: bool = True,
    residency: BlockResidency | None = None,
    start: StartPoint | None = None,
) -> PruningOutcome:
    """Prune ``model`` in place from ``calibration_batches`` (tensors of ``input_ids``).

    ``residency``: where each block is worked on (:class:`~mosaic_lightning.core.residency.BlockResidency`; e.g. on a
    GPU while the model stays in CPU memory, or streamed from and to disk). ``start``: continue a streamed run
    from the block it had reached (its earlier blocks already written out).
    """
    adapter = adapter or ModelAdapter(model, targets=config.targets, exclude=config.exclude)
    config = with_size_target(model, adapter, config)
    residency = residency or BlockResidency(adapter)
    pattern = config.parsed_pattern
    projections = adapter.all_projections()
    for proj in projections:
        pattern.check_shape(proj.in_features, adapter.module_name(proj))
    if not residency.commits_each_block:  # streamed blocks are checked as they are loaded
        _check_weights_finite(adapter)
    batches = list(calibration_batches)
    _check_token_ids(batches, model)
    report = PruningReport(config=config.to_dict())
    clock = time.perf_counter()
    start = start or StartPoint()
    plan = start.plan or plan_pruning(model, adapter, batches, config, progress, residency)
    report.timings["profile"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with _eval_mode(model), _pending_store(residency, start) as pending:
        pruned = _sequential_prune(model, adapter, batches, config, plan, progress, residency, start, pending)
        report.timings["prune"] = time.perf_counter() - clock
        masks = MaskStore()
        if not residency.commits_each_block:
            masks = _commit(adapter, pruned.pending)
            pruned.rows = [_report_row(adapter, p, masks, plan, pruned.seconds) for p in projections]
    report.calibration = {"batches": sum_over_ranks(len(batches)), "tokens": sum_over_ranks(pruned.tokens)}
    report.structure = pruned.pending.removed
    report.allocation = plan.allocation
    report.metrics.update(plan.size)
    report.projections = pruned.rows
    report.record_peak_memory("prune")
    return PruningOutcome(masks=masks, report=report, structure=pruned.pending.removed)


@dataclass
class StartPoint:
    """Where the block loop begins: block ``layer`` with these calibration hidden states (None: from the
    embeddings), the report rows and removed units of the blocks before it already made, and the plan they were
    pruned to (None: plan now; a resumed run reuses its saved plan, so the allocation's profile pass is not
    repeated)."""

    layer: int = 0
    hidden: list[torch.Tensor] | None = None
    rows: list[ProjectionReport] = field(default_factory=list)
    plan: Plan | None = None
    structure: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Pruned:
    pending: _Pending
    seconds: dict[str, float]
    tokens: int
    rows: list[ProjectionReport]


def _check_weights_finite(adapter: ModelAdapter) -> None:
    """NaN/inf in a targeted weight would pass through any method unnoticed (magnitude reads no data)."""
    for proj in adapter.all_projections():
        with gathered(proj.module):
            finite = bool(torch.isfinite(proj.weight_view()).all())
        if not finite:
            raise ValueError(f"{adapter.module_name(proj)}: its weights contain NaN or inf; no weight was changed")


def _check_token_ids(batches: list, model: nn.Module) -> None:
    """Calibration batches are integer token ids inside the vocabulary (else an IndexError deep in the embedding)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for i, ids in enumerate(batches):
        if not torch.is_tensor(ids) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            kind = ids.dtype if torch.is_tensor(ids) else type(ids).__name__
            raise TypeError(f"calibration_batches[{i}] is {kind}; give integer token ids (torch.long)")
        if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
            raise ValueError(
                f"calibration_batches[{i}] holds token ids in [{int(ids.min())}, {int(ids.max())}], outside the "
                f"model's vocabulary [0, {vocab}); were they made with this model's tokenizer?"
            )


def plan_pruning(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[torch.Tensor],
    config: PruningConfig,
    progress: bool = True,
    residency: BlockResidency | None = None,
) -> Plan:
    """Exact per-projection counts from the allocation (which measures what it needs on the dense model); with
    structure, units first and single weights fill up to the target. Shared by the engine and ADMM."""
    projections = adapter.all_projections()
    with _eval_mode(model):
        context = AllocationContext(model, adapter, batches, progress, config, residency)
        budget = config.allocation.allocate(context, config.sparsity)
    missing = [p.key for p in projections if p.key not in budget.sparsity]
    if missing:
        raise ValueError(f"allocation {config.allocation!r} gave no sparsity for projections {missing[:5]}")
    sizes = {p.key: p.numel for p in projections}
    goal = round(config.sparsity * sum(sizes.values()))
    groups = unit_groups(adapter, config.structured_units) if config.structured else []
    removals: dict[str, int] = {}
    structural: dict[str, int] = {}
    by_layer = _projections_by_layer(adapter)
    if groups:
        target = round(config.structured_fraction * goal)
        kept_heads = _kept_head_counts(model, config)
        removals = budget.unit_removals  # an allocation may plan the units itself (StructPrune's energy softmax)
        if removals is None:
            removals = plan_removals(groups, by_layer, budget.ratios, target, config.uniform_structure,
                                     config.structure_lambda, kept_heads, config.counts_biases)  # fmt: skip
        if config.whole_units:
            round_up_to_whole_units(
                removals, groups, by_layer, goal, config.uniform_structure, kept_heads, config.counts_biases
            )
        check_removals(groups, removals, f"allocation {config.allocation.label!r}")
        structural = structural_counts(groups, removals, by_layer)
    if config.whole_units:
        unstructured = dict.fromkeys(sizes, 0)
    else:
        unstructured = _single_weight_counts(config, budget, projections, sizes, structural, goal)
    counts = {k: structural.get(k, 0) + unstructured[k] for k in sizes}
    size = _planned_size(model, groups, removals, by_layer, config) if config.whole_units else {}
    if size and progress:
        tqdm.write(describe_size(size))
    return Plan(counts, unstructured, budget.ratios, groups, removals, budget.details, size)


def _single_weight_counts(
    config: PruningConfig,
    budget: Budget,
    projections: list[Projection],
    sizes: dict[str, int],
    structural: dict[str, int],
    goal: int,
) -> dict[str, int]:
    """Single weights each projection loses on top of its whole units, so the total is exactly ``goal``."""
    single = goal - sum(structural.values())
    if single < 0:
        raise ValueError(
            f"structured_fraction={config.structured_fraction}: whole units alone remove more than "
            f"sparsity={config.sparsity}; lower structured_fraction"
        )
    remaining = {k: n - structural.get(k, 0) for k, n in sizes.items()}
    quanta = count_quanta(config.parsed_pattern, projections)
    return exact_counts(remaining, budget.sparsity, config.sparsity, *config.bounds(), single, quanta)


def parameter_count(model: nn.Module) -> int:
    """Every parameter counted once (tied embeddings once), at its full size under ZeRO-3: ``num_parameters()``."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(math.prod(full_shape(p)) for p in unique)


def with_size_target(model: nn.Module, adapter: ModelAdapter, config: PruningConfig) -> PruningConfig:
    """``config`` with ``sparsity`` derived from its ``target_params`` (unchanged without one); a target that
    whole units cannot reach is refused here, before any work."""
    if config.target_params is None:
        return config
    dense = parameter_count(model)
    value = config.target_params
    target = config.target_param_count(dense)
    if target >= dense:
        raise ValueError(
            f"target_params={value!r} asks for {target:,} parameters, not fewer than the dense model's {dense:,}"
        )
    by_layer = _projections_by_layer(adapter)
    groups = unit_groups(adapter, config.structured_units)
    kept_heads = _kept_head_counts(model, config)
    most = {g.key: max(g.valid_removals(kept_heads)) for g in groups}
    smallest = dense - _removed_params(groups, most, by_layer)
    if target < smallest:
        raise ValueError(
            f"target_params={value!r} ({target:,} parameters) is out of reach: removing every unit that may go "
            f"({', '.join(config.structured_units)}; at least one per layer stays) leaves {smallest:,} of the "
            f"model's {dense:,}; ask for more parameters"
        )
    prunable = sum(p.numel for p in adapter.all_projections())
    return dataclasses.replace(config, sparsity=(dense - target) / prunable)


def _projections_by_layer(adapter: ModelAdapter) -> dict[int, dict[str, Projection]]:
    return {layer: {p.name: p for p in adapter.projections(layer)} for layer in range(adapter.num_layers)}


def _kept_head_counts(model: nn.Module, config: PruningConfig) -> set[int] | None:
    """Head counts a uniform plan may keep (those the family's config can state); ``None``: any."""
    return statable_head_counts(model.config) if config.uniform_structure else None


def _removed_params(groups: list[UnitGroup], removals: dict[str, int], by_layer) -> int:
    """Weights and biases that ``removals`` takes out of the model."""
    return sum(removals[g.key] * g.params_per_unit(by_layer[g.layer], with_biases=True) for g in groups)


def _planned_size(model, groups: list[UnitGroup], removals, by_layer, config: PruningConfig) -> dict:
    """What the compacted export will hold, known before any weight changes: parameters, bytes, kept units."""
    dense = parameter_count(model)
    after = dense - _removed_params(groups, removals, by_layer)
    dtype = next(model.parameters()).dtype
    size = {"params_dense": dense, "params_planned": after,
            "planned_file_mb": after * dtype.itemsize / 2**20}  # fmt: skip
    for kind in sorted({g.kind for g in groups}):
        size[f"kept_{kind}_per_layer"] = [g.count - removals[g.key] for g in groups if g.kind == kind]
    if config.target_params is not None:
        size["params_target"] = config.target_param_count(dense)
    return size


def describe_size(size: dict) -> str:
    """One line: the planned parameter count, against the target where there is one, file size and kept units."""
    text = f"whole-unit plan: {size['params_dense']:,} -> {size['params_planned']:,} parameters"
    if "params_target" in size:
        text += f" (target {size['params_target']:,}; {size['params_target'] - size['params_planned']:,} under)"
    text += f", about {size['planned_file_mb']:.0f} MB of weights"
    for key, kept in size.items():
        if key.startswith("kept_"):
            shown = kept[0] if len(set(kept)) == 1 else kept
            text += f"; {key.removeprefix('kept_').removesuffix('_per_layer')} kept per layer: {shown}"
    return text


@contextmanager
def _pending_store(residency: BlockResidency, start: StartPoint) -> Iterator[_Pending]:
    """Where pending results (keep masks, new weights) wait: in memory where each block is committed as soon as
    it is done (a block's worth), else in files in a temporary folder until the commit
    (:mod:`~mosaic_lightning.pruning.spill`), removed after."""
    if residency.commits_each_block:
        yield _Pending(removed=dict(start.structure))
        return
    with tempfile.TemporaryDirectory(prefix="mosaic-pending-") as folder:
        keeps, weights = pathlib.Path(folder, "keeps"), pathlib.Path(folder, "weights")
        keeps.mkdir()
        weights.mkdir()
        yield _Pending(SpilledTensors(keeps), SpilledTensors(weights), dict(start.structure))


@contextmanager
def _eval_mode(model: nn.Module):
    """Calibration runs without dropout; the model's own mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _sequential_prune(
    model, adapter, batches, config: PruningConfig, plan: Plan, progress: bool, residency: BlockResidency,
    start: StartPoint, pending: _Pending,
) -> _Pruned:  # fmt: skip
    """Block by block; see :class:`~mosaic_lightning.calibration.block.InputStream` for what ``sequential``
    changes. With a residency that commits each block, a block's result is written into it (and reported) once the next
    block's inputs are computed from it, and then the residency lets it go. ``pending``: where the results wait."""
    pruned = _Pruned(pending, {}, 0, list(start.rows))
    stream = InputStream(
        model, adapter, batches, config.sequential, lambda layer: _pending_values(adapter, layer, pruned.pending),
        residency, start.layer, start.hidden,
    )  # fmt: skip
    pattern = config.parsed_pattern
    layers = range(start.layer, adapter.num_layers)
    for layer in tqdm(layers, desc="pruning blocks", disable=not progress, initial=start.layer,
                      total=adapter.num_layers):  # fmt: skip
        residency.load(layer)
        try:
            _prune_block(adapter, layer, stream, pattern, config, plan, pruned)
            hidden = stream.finish(layer)
            if residency.commits_each_block:
                masks = _commit(adapter, pruned.pending, adapter.projections(layer))
                rows = [_report_row(adapter, p, masks, plan, pruned.seconds) for p in adapter.projections(layer)]
                pruned.rows.extend(rows)
                residency.save(layer, hidden, pruned.rows, plan, pruned.pending.removed)
                _forget(pruned.pending, adapter.projections(layer))
        finally:
            residency.unload(layer)
        _to_weights_device(pruned.pending, adapter.projections(layer))  # off the execution device
    pruned.tokens = stream.tokens
    return pruned


def _prune_block(adapter, layer: int, stream: InputStream, pattern, config: PruningConfig, plan: Plan,
                 pruned: _Pruned) -> None:  # fmt: skip
    """Prune block ``layer`` into ``pruned.pending`` (nothing is written into the model)."""
    counts = {p.key: plan.unstructured[p.key] for p in adapter.projections(layer)}
    block = BlockContext(adapter, layer, stream, pattern, counts, config.true_sequential)
    if not block.projections:
        return
    clock = time.perf_counter()
    _remove_units(block, config.method, plan, pruned.pending)
    results = config.method.prune_block(block)
    _check_results(block, results, plan, config)
    for proj in block.projections:
        result = results[proj.key]
        pruned.pending.keeps[proj.key] = result.keep
        if result.weight is not None:  # the method also changed kept weights (SparseGPT)
            pruned.pending.weights[proj.key] = result.weight[result.keep]  # row-major order of the [out, in] view
    produce = block.pruned_outputs()
    if produce is not None:
        stream.offer_pruned_outputs(layer, produce)
    spread = (time.perf_counter() - clock) / len(block.projections)  # block-level methods: an equal share
    pruned.seconds.update({p.key: block.seconds.get(p.key, spread) for p in block.projections})


def _to_weights_device(pending: _Pending, projections: list[Projection]) -> None:
    """Keep masks off the execution device (new weights go to the weights' device as they are written)."""
    for proj in projections:
        if isinstance(pending.keeps, SpilledTensors):  # already in host files: only where they are read back moves
            for store in (pending.keeps, pending.weights):
                if proj.key in store:
                    store.move(proj.key, proj.weight.device)
            continue
        keep = pending.keeps.get(proj.key)
        if keep is not None and keep.device != proj.weight.device:
            pending.keeps[proj.key] = keep.to(proj.weight.device)


def _forget(pending: _Pending, projections: list[Projection]) -> None:
    for proj in projections:
        pending.keeps.pop(proj.key, None)
        pending.weights.pop(proj.key, None)


def _report_row(adapter, proj: Projection, masks: MaskStore, plan: Plan, seconds: dict[str, float]):
    keep = proj.view_of(masks.masks[proj.param_name])
    count = plan.counts[proj.key]
    return projection_report(adapter, proj, keep, count, count - plan.unstructured[proj.key],
                             plan.ratios.get(proj.key), seconds.get(proj.key, 0.0))  # fmt: skip


def _remove_units(block: BlockContext, method, plan: Plan, pending: _Pending) -> None:
    """Let the method choose the block's planned units (``method.select_units``) and record their structural
    keep masks on the block for the method to prune around."""
    projs = {p.name: p for p in block.projections}
    for group in (g for g in plan.unit_groups if g.layer == block.layer):
        removed = method.select_units(block, group, plan.removals[group.key])
        check_removals([group], {group.key: plan.removals[group.key]}, f"method {method!r}", removed)
        pending.removed[group.key] = removed
        for name in (*group.rows, *group.cols):
            key = projs[name].key
            keep = structural_keep(group, removed, projs[name])
            block.structural[key] = keep if key not in block.structural else block.structural[key] & keep


def _check_results(block: BlockContext, results: dict[str, PruneResult], plan: Plan, config: PruningConfig) -> None:
    """Every projection got a keep mask of its shape with exactly the planned number of weights pruned."""
    method = config.method
    for proj in block.projections:
        result = results.get(proj.key)
        if result is None:
            raise RuntimeError(f"method {method!r} returned no result for {block.adapter.module_name(proj)}")
        shape = (proj.out_features, proj.in_features)
        if tuple(result.keep.shape) != shape or result.keep.dtype != torch.bool:
            raise RuntimeError(
                f"method {method!r}: keep mask of {block.adapter.module_name(proj)} is "
                f"{result.keep.dtype}{list(result.keep.shape)}, expected torch.bool{list(shape)}"
            )
    counted = torch.stack([(~results[p.key].keep).sum() for p in block.projections]).tolist()  # one host sync
    for proj, pruned in zip(block.projections, counted, strict=True):
        if pruned != plan.counts[proj.key]:
            raise RuntimeError(
                f"method {method!r} pruned {pruned} weights of {block.adapter.module_name(proj)}, the plan says "
                f"{plan.counts[proj.key]}: a method must prune exactly block.num_prune[key] besides removed units"
            )


def _pending_values(adapter: ModelAdapter, layer: int, pending: _Pending) -> dict[nn.Parameter, torch.Tensor] | None:
    """Full parameter tensors of block ``layer`` with its pending ``[out, in]`` results written in (None while
    the block has none)."""
    projs = [p for p in adapter.projections(layer) if p.key in pending.keeps]
    if not projs:
        return None

    def edit(proj: Projection, view: torch.Tensor) -> None:
        _write_pending(view, pending.keeps[proj.key], pending.weights.get(proj.key))

    return parameter_values(projs, edit)


def _write_pending(view: torch.Tensor, keep: torch.Tensor, kept_values: torch.Tensor | None) -> None:
    """Write a pending result into a projection's ``[out, in]`` ``view``: pruned entries zero, the kept ones the
    method's new values where it changed them (``kept_values``, in the row-major order of ``keep``)."""
    if kept_values is None:
        view.masked_fill_(~keep, 0)
    else:
        view.zero_().masked_scatter_(keep, kept_values.to(device=view.device, dtype=view.dtype))


@torch.no_grad()
def _commit(adapter: ModelAdapter, pending: _Pending, projections: list[Projection] | None = None) -> MaskStore:
    """Write the pending results of ``projections`` (default: all) into the model; their mask store. New weights
    leave ``pending`` as they are written (they are the model's now; held in files, their files go)."""
    projections = adapter.all_projections() if projections is None else projections
    for proj in projections:
        if proj.key in pending.weights:
            with gathered(proj.module, modify=True):
                _write_pending(proj.weight_view(), pending.keeps[proj.key], pending.weights.pop(proj.key))
    return commit_masks(adapter, pending.keeps, projections)


@torch.no_grad()
def commit_masks(
    adapter: ModelAdapter, keeps: dict[str, torch.Tensor], projections: list[Projection] | None = None
) -> MaskStore:
    """Parameter-level mask store from ``[out, in]`` keep masks by projection key (of ``projections``, by
    default all), applied to the model.

    Shared by the engine and solvers that choose masks themselves (ADMM), so fused and transposed
    projections (GPT-2's ``c_attn``) are laid out in one place.
    """
    masks = MaskStore()
    full_masks: dict[str, torch.Tensor] = {}
    for proj in adapter.all_projections() if projections is None else projections:
        if proj.param_name not in full_masks:
            shape = full_shape(proj.weight)
            full_masks[proj.param_name] = torch.ones(shape, dtype=torch.bool, device=proj.weight.device)
        mask = full_masks[proj.param_name]
        proj.to_param_layout(keeps[proj.key], mask)
    for name, mask in full_masks.items():
        masks.set(name, mask)
    masks.enforce_(adapter.model)
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
