"""Structured units for composite pruning: MLP channels and attention heads, removed whole.

A unit couples slices of several projections: MLP channel ``c`` is row ``c`` of gate and up and column ``c``
of down; query head ``h`` is ``head_dim`` rows of q and columns of o (plus k and v rows when every head has
its own key/value head). Removing a unit zeroes all its slices, which is what lets :mod:`.compact` then drop
them physically without changing the function.

Grouped-query attention: query heads come in ``num_kv_heads`` groups that share one key/value head, and
every group must keep the same number of query heads, so removals are made in equal numbers per group.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from huggingface_hub.errors import StrictDataclassError

from .adapters import ModelAdapter, Projection

MLP, HEADS = "mlp", "heads"
UNIT_KINDS = (MLP, HEADS)
SHAPES_KEY = "mosaic_layer_shapes"  # per-layer unit counts of a compacted model, in its config


@dataclass(frozen=True)
class UnitGroup:
    """The removable units of one kind in one block."""

    kind: str
    layer: int
    count: int  # number of units (MLP channels, query heads)
    size: int  # rows/columns per unit (1 for a channel, head_dim for a head)
    rows: tuple[str, ...]  # projections that lose the unit's output rows
    cols: tuple[str, ...]  # projections that lose the unit's input columns (their inputs score the units)
    groups: int = 1  # units are removed in equal numbers from each of this many consecutive groups

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.kind}"

    def params_per_unit(self, projections: dict[str, Projection], with_biases: bool = False) -> int:
        """Weights one unit takes out of its block; ``with_biases``: its bias entries too (a removed output row
        takes its bias entry), for counting the model's parameters rather than its projection weights."""
        rows = sum(projections[n].in_features for n in self.rows)
        cols = sum(projections[n].out_features for n in self.cols)
        biases = sum(getattr(projections[n].module, "bias", None) is not None for n in self.rows) if with_biases else 0
        return self.size * (rows + cols + biases)

    def valid_removals(self, kept_heads: set[int] | None = None) -> list[int]:
        """Numbers of units that can be removed (equal per group, at least one unit kept per group); for heads
        with ``kept_heads`` (:func:`statable_head_counts`), only those that leave one of these counts."""
        per_group = self.count // self.groups
        removals = [k * self.groups for k in range(per_group)]
        if self.kind == HEADS and kept_heads is not None:
            return [n for n in removals if self.count - n in kept_heads]
        return removals


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) from a transformers config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, kv_heads, head_dim


def states_heads(config, kept: int) -> bool:
    """Whether the family's own config can state ``kept`` query heads, so plain ``from_pretrained`` builds them:
    it needs ``num_key_value_heads`` (OPT and GPT-2 derive the head size from ``hidden_size / heads``) and its
    validation must accept the values (Llama and Gemma3 require ``hidden_size % num_attention_heads == 0``
    even with an explicit ``head_dim``)."""
    if not hasattr(config, "num_key_value_heads"):
        return False
    heads, kv_heads, head_dim = attention_shape(config)
    values = {"num_attention_heads": kept, "head_dim": head_dim}
    if kv_heads == heads:
        values["num_key_value_heads"] = kept
    fields = {k: v for k, v in config.to_dict().items() if k != SHAPES_KEY}
    try:
        type(config)(**{**fields, **values})
    except (ValueError, TypeError, StrictDataclassError):
        return False
    return True


def statable_head_counts(config) -> set[int]:
    """The query-head counts a compacted model may keep in every layer and still load with plain
    ``from_pretrained``: the full count, and each smaller count grouped-query attention allows that the family's
    config accepts (none smaller for OPT and GPT-2; for Gemma-3 with hidden size 640 and 4 heads, not 3)."""
    heads, kv_heads, _ = attention_shape(config)
    step = kv_heads if kv_heads != heads else 1
    return {heads} | {kept for kept in range(step, heads, step) if states_heads(config, kept)}


def unit_groups(adapter: ModelAdapter, kinds: list[str]) -> list[UnitGroup]:
    """Unit groups of every block, checking that all coupled projections are targeted."""
    for kind in kinds:
        if kind not in UNIT_KINDS:
            raise ValueError(f"structured_units item {kind!r}; allowed values: {list(UNIT_KINDS)}")
    heads, kv_heads, head_dim = attention_shape(adapter.model.config)
    found = []
    for layer in range(adapter.num_layers):
        projs = {p.name: p for p in adapter.projections(layer)}
        if MLP in kinds:
            rows = tuple(n for n in ("gate", "up") if n in adapter.spec.projections)
            _require(projs, (*rows, "down"), MLP, layer)
            found.append(UnitGroup(MLP, layer, projs["down"].in_features, 1, rows, ("down",)))
        if HEADS in kinds:
            shared_kv = heads != kv_heads
            rows = ("q",) if shared_kv else ("q", "k", "v")
            _require(projs, (*rows, "o"), HEADS, layer)
            found.append(UnitGroup(HEADS, layer, heads, head_dim, rows, ("o",), kv_heads if shared_kv else 1))
    return found


def _require(projs: dict[str, Projection], names: tuple[str, ...], kind: str, layer: int) -> None:
    missing = [n for n in names if n not in projs]
    if missing:
        raise ValueError(
            f"structured_units={kind!r} removes slices of {list(names)} together, but {missing} of layer {layer} "
            "are not targeted; add them to targets or drop the unit kind"
        )


def unit_scores(group: UnitGroup, projections: dict[str, Projection], column_norms: torch.Tensor) -> torch.Tensor:
    """Wanda-style unit importance: the summed ``|W_ij| * ||X_j||`` of the unit's input columns in down/o."""
    consumer = projections[group.cols[0]]
    contribution = (consumer.weight_view().abs().float() * column_norms[None, :]).sum(dim=0)
    return contribution.view(group.count, group.size).sum(dim=1)


def choose_removed(group: UnitGroup, scores: torch.Tensor, num_remove: int) -> list[int]:
    """The lowest-scoring units, in equal numbers per group (GQA), sorted."""
    if num_remove not in group.valid_removals():
        raise ValueError(f"{group.key}: cannot remove {num_remove} units; valid: {group.valid_removals()}")
    per_group = group.count // group.groups
    removed = []
    for g in range(group.groups):
        local = scores[g * per_group : (g + 1) * per_group]
        lowest = torch.topk(local, num_remove // group.groups, largest=False).indices
        removed += [g * per_group + i for i in lowest.tolist()]  # one host sync, not one per unit
    return sorted(removed)


def check_removals(
    groups: list[UnitGroup], removals: dict[str, int], who: str, removed: list[int] | None = None
) -> None:
    """A plan (units per group) or one group's chosen units that the engine can apply: every group planned, each
    count valid (equal per GQA group, one unit left per group) and, with ``removed``, distinct in-range indices in
    equal numbers per group. ``who`` (the allocation or method) is named in the error."""
    keys = {g.key for g in groups}
    if set(removals) != keys:
        raise ValueError(f"{who} planned unit groups {sorted(removals)}, expected exactly {sorted(keys)}")
    for g in groups:
        if removals[g.key] not in g.valid_removals():
            raise ValueError(f"{who}: {g.key} loses {removals[g.key]} units; valid: {g.valid_removals()}")
    if removed is None:
        return
    group = groups[0]
    per_group = group.count // group.groups
    counts = [sum(1 for u in removed if u // per_group == i) for i in range(group.groups)]
    ordered = sorted(set(removed)) == list(removed) and all(0 <= u < group.count for u in removed)
    if not ordered or len(removed) != removals[group.key] or len(set(counts)) > 1:
        raise ValueError(
            f"{who} chose units {removed} of {group.key}: need {removals[group.key]} sorted distinct indices in "
            f"[0, {group.count}), equal numbers from each of {group.groups} groups"
        )


def structural_keep(group: UnitGroup, removed: list[int], proj: Projection) -> torch.Tensor:
    """``[out, in]`` keep mask of one projection after removing ``removed`` units of ``group``."""
    keep = torch.ones(proj.out_features, proj.in_features, dtype=torch.bool, device=proj.weight.device)
    for unit in removed:
        span = slice(unit * group.size, (unit + 1) * group.size)
        if proj.name in group.rows:
            keep[span, :] = False
        if proj.name in group.cols:
            keep[:, span] = False
    return keep


def plan_removals(
    groups: list[UnitGroup],
    projections: dict[int, dict[str, Projection]],
    outlier_ratios: dict[str, float],
    structural_params: int,
    uniform: bool,
    lam: float,
    kept_heads: Collection[int] | None = None,
    with_biases: bool = False,
) -> dict[str, int]:
    """How many units each group loses so that about ``structural_params`` weights go structurally
    (``with_biases``: parameters, bias entries included, for a size target).

    Groups with fewer outliers (robust) lose more, by OWL's rule applied to unit groups. Heads are coarse
    (a head is ``head_dim`` rows), so they are rounded first and MLP channels absorb the difference. With
    ``uniform``, every layer loses the same number of units of a kind (plain HF configs can describe it).
    ``kept_heads``: the only query-head counts a group may keep (None: any that grouped-query attention allows);
    where only the full count is allowed, no head goes and MLP channels take the whole share.
    The plan never removes more than ``structural_params``: single weights fill the gap, or
    :func:`round_up_to_whole_units` adds units.
    """
    per_unit = {g.key: g.params_per_unit(projections[g.layer], with_biases) for g in groups}
    ratios = {g.key: _group_ratio(g, projections[g.layer], outlier_ratios) for g in groups}
    if uniform:
        for kind in UNIT_KINDS:
            mine = [g.key for g in groups if g.kind == kind]
            if mine:
                mean = sum(ratios[k] for k in mine) / len(mine)
                ratios.update(dict.fromkeys(mine, mean))
    fractions = _fractions(groups, per_unit, ratios, structural_params, lam)
    plan = {}
    wanted = {g.key: fractions[g.key] * g.count for g in groups if g.kind == HEADS}
    for g in groups:
        if g.kind == HEADS:
            plan[g.key] = min(g.valid_removals(kept_heads), key=lambda n, g=g: abs(n - wanted[g.key]))
    remaining = structural_params - sum(plan[g.key] * per_unit[g.key] for g in groups if g.kind == HEADS)
    mlp = [g for g in groups if g.kind == MLP]
    if mlp:
        mlp_fractions = _fractions(mlp, per_unit, ratios, max(remaining, 0), lam)
        raw = {g.key: mlp_fractions[g.key] * g.count for g in mlp}
        if uniform:
            raw = dict.fromkeys(raw, sum(raw.values()) / len(raw))
        for g in mlp:
            plan[g.key] = min(round(raw[g.key]), g.count - 1)
        wanted.update(raw)
    _trim(plan, groups, per_unit, wanted, structural_params, uniform)
    return plan


def round_up_to_whole_units(
    plan: dict[str, int],
    groups: list[UnitGroup],
    projections: dict[int, dict[str, Projection]],
    goal: int,
    uniform: bool,
    kept_heads: Collection[int] | None = None,
    with_biases: bool = False,
) -> None:
    """Add whole units to ``plan`` in place, MLP channels first, then heads, until it removes at least ``goal``
    weights (``with_biases``: parameters, bias entries included, for a size target): the smallest such removal for
    the plan's split between heads and channels (a channel is the finer step). Uniform plans grow every layer
    together; per-layer plans grow the layer that lost the fewest units."""
    per_unit = {g.key: g.params_per_unit(projections[g.layer], with_biases) for g in groups}
    for kind in (MLP, HEADS):
        while sum(plan[g.key] * per_unit[g.key] for g in groups) < goal:
            growable = [g for g in groups if g.kind == kind and _next_removal(g, plan[g.key], kept_heads) is not None]
            if uniform and len(growable) < sum(g.kind == kind for g in groups):
                growable = []  # uniform: every layer grows together, or none does
            if not growable:
                break
            grow = growable if uniform else [min(growable, key=lambda g: plan[g.key] / g.count)]
            for g in grow:
                plan[g.key] = _next_removal(g, plan[g.key], kept_heads)
    removed = sum(plan[g.key] * per_unit[g.key] for g in groups)
    if removed < goal:
        what = "parameters" if with_biases else "weights"
        raise ValueError(
            f"whole units can remove at most {removed:,} {what} here, fewer than the {goal:,} asked for; ask for a "
            "smaller reduction or add unit kinds"
        )


def _next_removal(group: UnitGroup, current: int, kept_heads) -> int | None:
    larger = [n for n in group.valid_removals(kept_heads) if n > current]
    return min(larger) if larger else None


def _trim(plan: dict[str, int], groups, per_unit, wanted: dict[str, float], limit: int, uniform: bool) -> None:
    """Undo roundings up (MLP channels first, then heads) while the units remove more than ``limit`` weights, so a
    structured-only plan never exceeds its target (single weights fill the gap); ``uniform`` trims every layer."""
    for kind in (MLP, HEADS):
        mine = [g for g in groups if g.kind == kind]
        while sum(plan[g.key] * per_unit[g.key] for g in groups) > limit and any(plan[g.key] for g in mine):
            candidates = [g for g in mine if plan[g.key]]
            trim = candidates if uniform else [max(candidates, key=lambda g: plan[g.key] - wanted[g.key])]
            for g in trim:
                plan[g.key] -= g.groups


def _group_ratio(group: UnitGroup, projs: dict[str, Projection], ratios: dict[str, float]) -> float:
    names = [n for n in (*group.rows, *group.cols) if projs[n].key in ratios]
    if not names:
        return 0.0
    weight = sum(projs[n].numel for n in names)
    return sum(ratios[projs[n].key] * projs[n].numel for n in names) / weight


def _fractions(groups, per_unit, ratios, structural_params, lam) -> dict[str, float]:
    """Per-group removed fraction: OWL's rule around a base solved so the removed weights sum to the goal."""
    values = torch.tensor([ratios[g.key] for g in groups], dtype=torch.float64)
    spread = values.max() - values.min()
    norm = (values - values.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(values)
    offsets = (norm - norm.mean()).tolist()
    sizes = [g.count * per_unit[g.key] for g in groups]
    limit = [1 - 1 / (g.count // g.groups) for g in groups]  # keep at least one unit per group

    def removed(base: float) -> float:
        return sum(s * min(max(base - o, 0.0), lim) for s, o, lim in zip(sizes, offsets, limit, strict=True))

    if removed(2.0) < structural_params:
        raise ValueError(
            f"structured part of {structural_params:,} weights exceeds what the unit kinds can remove "
            f"({int(removed(2.0)):,}); lower structured_fraction or add unit kinds"
        )
    lo, hi = -1.0, 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < structural_params else (lo, mid)
    base = (lo + hi) / 2
    return {g.key: min(max(base - o, 0.0), lim) for g, o, lim in zip(groups, offsets, limit, strict=True)}


def check_kept_heads(num_heads: int, num_kv_heads: int, kept: int) -> None:
    """A kept query-head count GQA can take: a positive multiple of the number of key/value heads."""
    if kept <= 0 or kept > num_heads or kept % num_kv_heads:
        valid = list(range(num_kv_heads, num_heads + 1, num_kv_heads))
        nearest = sorted(valid, key=lambda v: abs(v - kept))[:2]
        raise ValueError(
            f"cannot keep {kept} query heads with {num_kv_heads} key/value heads (grouped-query attention keeps an "
            f"equal number per group); nearest valid sizes: {sorted(nearest)} (all valid: {valid})"
        )


def structural_counts(groups: list[UnitGroup], plan: dict[str, int], projections: dict[int, dict[str, Projection]]):
    """Weights each projection loses to the planned unit removals, by projection key."""
    counts: dict[str, int] = {}
    for g in groups:
        for name in (*g.rows, *g.cols):
            proj = projections[g.layer][name]
            width = proj.in_features if name in g.rows else proj.out_features
            counts[proj.key] = counts.get(proj.key, 0) + plan[g.key] * g.size * width
    return counts
