"""Quality table on the real model and real text: perplexity for each method x allocation x sparsity.

    python bench/quality.py --calibration-samples 32 --eval-windows 64 --out bench/out/quality.json

Each row prunes a fresh copy of the bundled SmolLM2-135M with calibration windows from the first 80 Wikipedia
articles and evaluates perplexity on 512-token windows of the last 20 (never calibrated on).

Spread over calibration draws: ``--draws N`` runs every row on N calibration draws (seeds 0..N-1 of the window
draw; seed 0 is the draw every single-draw table used), with the held-out windows fixed; each cell is then
reported as the mean, min and max over the draws, with each draw's wall time, and the campaign's CPU time:

    python bench/quality.py --suite mosaic-variants --methods sparsegpt --sparsities 0.7 --draws 3 \
        --out bench/out/mosaic-variants-sparsegpt-70.json

``--true-sequential`` calibrates every selected row in true-sequential order (q/k/v, o, gate/up, down in turn);
the ``order`` suite compares the orders itself. ``mosaic-variants`` covers 50-80%; narrow it with ``--sparsities``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import torch

from mosaic_lightning import PruningConfig, compact_model, perplexity, prune_model
from mosaic_lightning.allocation import MSP, Mosaic, OutlierWeighted
from mosaic_lightning.core.assets import BUNDLED_MODEL, load_causal_lm, load_tokenizer, wikipedia_split
from mosaic_lightning.evaluation.zero_shot import metric_cell, task_manager, zero_shot_accuracy
from mosaic_lightning.lit.data import TokenWindows

ROWS = [
    ("magnitude", "uniform"),
    ("wanda", "uniform"),
    ("sparsegpt", "uniform"),
    ("wanda", "owl"),
    ("wanda", "mosaic"),
    ("sparsegpt", "mosaic"),
]
SETTINGS = [(0.5, "unstructured"), (0.7, "unstructured"), (0.5, "2:4")]
# Composite suite: equal parameter reduction, structured share of the pruned weights 0 / 0.62 / 1.
COMPOSITE = [(s, f) for s in (0.3, 0.5) for f in (0.0, 0.62, 1.0)]
# Sequential suite: calibrating block l on blocks < l as pruned (default) vs on dense activations (one pass).
SEQUENTIAL = [(s, m, q) for s in (0.5, 0.7) for m in ("wanda", "sparsegpt") for q in (True, False)]
# Order suite: within a block, every projection from the block as it entered (default) vs true-sequential.
ORDER = [(s, m, t) for s in (0.5, 0.7) for m in ("wanda", "sparsegpt") for t in (False, True)]
# MSP N:M suite: at a 75% mean with M = 8, uniform 2:8 vs MSP's per-layer N ("mixed:8").
MSP_NM = [("uniform", "2:8"), ("msp", "mixed:8")]
# Allocation suite: uniform vs OWL vs published Mosaic, x Wanda / SparseGPT, 50-80%.
ALLOCATION = [
    (s, a, m) for s in (0.5, 0.6, 0.7, 0.8) for a in ("uniform", "owl", "mosaic") for m in ("wanda", "sparsegpt")
]
TYPES = ("q", "k", "v", "o", "gate", "up", "down")
# Mosaic variants suite: the allocation's open questions (threshold M, how the per-type term enters), against uniform
# and OWL; every Mosaic variant is labelled mosaic-M<threshold>-<offset> (--allocations accepts these labels).
MOSAIC_VARIANTS = [(m, o) for m in (5.0, 3.0) for o in ("published", "off", "flipped", "centred")]
# SparseLLM suite: the joint MLP solve vs SparseGPT and Wanda at high sparsity (uniform, as the reference).
SPARSELLM = [(s, m) for s in (0.7, 0.8, 0.9) for m in ("wanda", "sparsegpt", "sparsellm")]
# MSP suite: the Fisher + evolutionary allocation vs uniform and OWL at 75% (and 70%, 80%; recipe msp-75's search).
MSP_ROWS = [(s, m, a) for s in (0.7, 0.75, 0.8) for m in ("wanda", "sparsegpt") for a in ("uniform", "owl", "msp")]
# StructPrune suite: structured only (structured_fraction=1), per-layer sizes; StructPrune (ADMM mask + refit, energy
# softmax) vs today's planner (Wanda unit scores, OWL rule on unit groups), at equal parameters removed.
STRUCTPRUNE = [(s, m, a) for s in (0.3, 0.5) for m, a in (("structprune", "energy"), ("wanda", "owl"))]
# Accuracy suite (with --tasks): Wanda / SparseGPT / Mosaic at 50%, and composite (Mosaic, 62% of
# the removed weights as whole units) vs structured-only at 30% and 50% of projection weights removed.
ACCURACY = [(0.5, m, a, 0.0) for m, a in (("wanda", "uniform"), ("sparsegpt", "uniform"), ("sparsegpt", "mosaic"))]
ACCURACY += [(s, "wanda", "mosaic", f) for s in (0.3, 0.5) for f in (0.62, 1.0)]


def variant(allocation) -> str:
    """The allocation's label, with a Mosaic allocation's threshold and offset mode (``mosaic-M5-published``)."""
    if isinstance(allocation, Mosaic):
        return f"mosaic-M{allocation.threshold:g}-{allocation.offset}"
    return allocation.label


class ProfileCache:
    """``--reuse-profiles``: the outlier profile (a dense pass of Wanda scores) depends only on the allocation class,
    its threshold and the calibration draw, so Mosaic's offset modes on one draw share it (exactly the same numbers).
    Rows that reused one are marked ``profile_reused`` and their ``prune_s`` lacks that pass: its first computation's
    time is ``profile_s`` of the row that computed it."""

    def __init__(self) -> None:
        self.saved: dict[tuple, dict[str, float]] = {}
        self.reused, self.seconds = False, 0.0
        original = OutlierWeighted.outlier_profile

        def cached(allocation, context, groups):
            key = (type(allocation).__name__, allocation.threshold, tuple(id(b) for b in context.batches))
            if key in self.saved:
                self.reused = True
                return self.saved[key]
            clock = time.perf_counter()
            self.saved[key] = original(allocation, context, groups)
            self.seconds = time.perf_counter() - clock
            return self.saved[key]

        OutlierWeighted.outlier_profile = cached

    def take(self) -> dict:
        """What the last row did: ``{"profile_reused": True}`` or ``{"profile_s": seconds}`` (or nothing)."""
        row = {"profile_reused": True} if self.reused else ({"profile_s": self.seconds} if self.seconds else {})
        self.reused, self.seconds = False, 0.0
        return row


def configs(args) -> list[PruningConfig]:
    """The suite's rows, narrowed by --allocations / --methods / --sparsities where given; --msp-args replaces
    the MSP allocation's arguments (JSON); --true-sequential calibrates every selected row in true-sequential order
    (a row that cannot be is refused by PruningConfig, naming why)."""
    rows = _suite(args.suite)
    if args.msp_args:
        rows = [dataclasses.replace(c, allocation=MSP(**json.loads(args.msp_args))) if c.allocation.label == "msp"
                else c for c in rows]  # fmt: skip
    selected = [
        c for c in rows
        if (args.allocations is None or c.allocation.label in args.allocations or variant(c.allocation)
            in args.allocations)
        and (args.methods is None or c.method.label in args.methods)
        and (args.sparsities is None or c.sparsity in args.sparsities)
    ]  # fmt: skip
    if args.true_sequential:
        selected = [dataclasses.replace(c, true_sequential=True) for c in selected]
    return selected


def _suite(suite: str) -> list[PruningConfig]:
    if suite == "allocation":
        return [PruningConfig(s, m, a) for s, a, m in ALLOCATION]
    if suite == "mosaic-variants":
        sparsities, methods = (0.5, 0.6, 0.7, 0.8), ("wanda", "sparsegpt")
        return [PruningConfig(s, m, a) for s in sparsities for m in methods for a in ("uniform", "owl")] + [
            PruningConfig(s, m, Mosaic(threshold=t, offset=o)) for s in sparsities for m in methods
            for t, o in MOSAIC_VARIANTS
        ]  # fmt: skip
    if suite == "sparsellm":
        return [PruningConfig(s, m, "uniform") for s, m in SPARSELLM]
    if suite == "msp":
        return [PruningConfig(s, m, a) for s, m, a in MSP_ROWS]
    if suite == "structprune":
        return [PruningConfig(s, m, a, structured_fraction=1.0) for s, m, a in STRUCTPRUNE]
    if suite == "sequential":
        return [PruningConfig(s, m, "uniform", sequential=q) for s, m, q in SEQUENTIAL]
    if suite == "order":
        return [PruningConfig(s, m, "uniform", true_sequential=t) for s, m, t in ORDER]
    if suite == "msp-nm":
        return [PruningConfig(0.75, "wanda", a, pattern=p) for a, p in MSP_NM]
    if suite == "accuracy":
        return [PruningConfig(s, m, a, structured_fraction=f, uniform_structure=f > 0) for s, m, a, f in ACCURACY]
    if suite == "composite":
        return [
            PruningConfig(s, "wanda", "mosaic", structured_fraction=f, uniform_structure=True) for s, f in COMPOSITE
        ]
    return [
        PruningConfig(sparsity=sparsity, method=method, allocation=allocation, pattern=pattern)
        for sparsity, pattern in SETTINGS
        for method, allocation in ROWS
        # N:M fixes every projection's sparsity: per-projection allocation does not apply
        if pattern == "unstructured" or allocation == "uniform"
    ]


def _accuracy_scorer(tasks: list[str] | None, limit: int, tokenizer):
    """``model -> {"tasks": {task: lm-eval metrics}}`` through the package's lm-eval wrapper, or ``{}`` without tasks
    (the task names are checked here, before any pruning)."""
    if not tasks:
        return lambda model: {}
    manager = task_manager(tasks)
    return lambda model: {"tasks": zero_shot_accuracy(model, tokenizer, tasks, manager, limit=limit)}


def _layer_means(report) -> list[float]:
    """Parameter-weighted requested sparsity of every layer."""
    layers: dict[int, list[float]] = {}
    for p in report.projections:
        pruned, total = layers.setdefault(p.layer, [0.0, 0.0])
        layers[p.layer] = [pruned + p.requested_sparsity * p.numel, total + p.numel]
    return [pruned / total for pruned, total in (layers[i] for i in sorted(layers))]


def windows(texts: list[str], tokenizer, seq_len: int) -> TokenWindows:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    return TokenWindows(torch.tensor(ids), seq_len)


def calibration_and_heldout(tokenizer, samples: int, heldout: int, seq_len: int, seed: int = 0):
    """(calibration batches: ``samples`` random windows of the first 80 articles, drawn with ``seed``; held-out
    batches: the first ``heldout`` windows of the last 20, the same for every seed), 4 sequences a batch."""
    train, test = wikipedia_split()
    train_windows = windows(train, tokenizer, seq_len).windows
    order = torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(seed))
    calibration = list(train_windows[order[:samples]].split(4))
    return calibration, list(windows(test, tokenizer, seq_len).windows[:heldout].split(4))


def cell_key(row: dict) -> tuple:
    """What makes two rows the same cell (everything but the calibration draw)."""
    return (row["method"], row["variant"], row["sparsity"], row["pattern"], row.get("structured_fraction"),
            row.get("sequential"), row.get("true_sequential"))  # fmt: skip


def spread(results: list[dict]) -> list[dict]:
    """One entry per cell: perplexity mean / min / max over its draws, each draw's seed, perplexity and wall time."""
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        if r["method"] != "dense":
            cells.setdefault(cell_key(r), []).append(r)
    out = []
    for rows in cells.values():
        ppl = [r["ppl"] for r in rows]
        out.append({
            "method": rows[0]["method"], "allocation": rows[0]["variant"], "sparsity": rows[0]["sparsity"],
            "pattern": rows[0]["pattern"], "sequential": rows[0].get("sequential"),
            "true_sequential": rows[0].get("true_sequential"), "draws": len(rows), "seeds": [r["seed"] for r in rows],
            "ppl": ppl, "ppl_mean": sum(ppl) / len(ppl), "ppl_min": min(ppl), "ppl_max": max(ppl),
            "prune_s": [r["prune_s"] for r in rows], "wall_s": [r["wall_s"] for r in rows],
        })  # fmt: skip
    return out


def spread_table(paths: list[str]) -> str:
    """Markdown: one line per cell of the given JSON files, perplexity mean [min, max] over the draws, wall seconds
    per draw (prune + held-out perplexity), each file's campaign CPU and wall time and their total, and the
    orderings that hold on every draw. Cells calibrated on different token counts are never compared."""
    lines = ["| method | allocation | sparsity | calibration | draws | ppl mean | min | max | wall s per draw |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    notes, cells, cpu_s = [], [], 0.0
    for path in paths:
        data = json.loads(pathlib.Path(path).read_text())
        calibration = f"{data['args']['calibration_samples']} x {data['args']['seq_len']}"
        for c in data["cells"]:
            walls = " / ".join(f"{w:.0f}" for w in c["wall_s"])
            lines.append(f"| {c['method']} | {c['allocation']}{_order(c)} | {c['sparsity']:.0%} | {calibration} "
                         f"| {c['draws']} | {c['ppl_mean']:.2f} | {c['ppl_min']:.2f} | {c['ppl_max']:.2f} "
                         f"| {walls} |")  # fmt: skip
            cells.append({**c, "calibration": calibration})
        notes.append(f"{path}: campaign {data['cpu_s']:.0f} s CPU, {data['wall_s']:.0f} s wall")
        cpu_s += data["cpu_s"]
    notes.append(f"total: {cpu_s:.0f} s CPU ({cpu_s / 3600:.1f} h) over {len(paths)} file(s)")
    return "\n".join(lines + [""] + notes + [""] + orderings(cells))


def orderings(cells: list[dict]) -> list[str]:
    """Per sparsity, pattern and calibration size: the cells by mean perplexity, each neighbour pair joined by
    ``<`` where the lower one is lower on every draw both ran (seeds matched) and by ``~`` where some draw reverses
    it ("within the spread"); then every pair, neighbours or not, that holds on every draw. Cells of one draw take
    no part: one draw states no ordering."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        if c["draws"] > 1:
            groups.setdefault((c["sparsity"], c["pattern"], c.get("calibration", "")), []).append(c)
    lines = []
    for (sparsity, pattern, calibration), group in sorted(groups.items()):
        group.sort(key=lambda c: c["ppl_mean"])
        chain = _label(group[0])
        for lower, higher in zip(group, group[1:], strict=False):
            chain += f" {'<' if _lower_on_every_draw(lower, higher) else '~'} {_label(higher)}"
        held = [f"{_label(a)} < {_label(b)}" for i, a in enumerate(group) for b in group[i + 1 :]
                if _lower_on_every_draw(a, b)]  # fmt: skip
        size = f", {calibration} calibration" if calibration else ""
        lines += [f"{sparsity:.0%} {pattern}{size}: {chain}", f"  on every draw: {'; '.join(held) or 'none'}"]
    return lines


def _label(cell: dict) -> str:
    return f"{cell['method']} {cell['allocation']}{_order(cell)}"


def _order(cell: dict) -> str:
    """The calibration order where it is not the default."""
    order = " true-sequential" if cell.get("true_sequential") else ""
    return order + (" one-pass" if cell.get("sequential") is False else "")


def _lower_on_every_draw(lower: dict, higher: dict) -> bool:
    a = dict(zip(lower["seeds"], lower["ppl"], strict=True))
    b = dict(zip(higher["seeds"], higher["ppl"], strict=True))
    common = a.keys() & b.keys()
    return len(common) > 1 and all(a[seed] < b[seed] for seed in common)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", nargs="*", default=None, help="print the spread table of these JSON files; no run")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--suite", choices=["core", "composite", "sequential", "order", "allocation", "sparsellm",
                                            "msp", "msp-nm", "structprune", "accuracy", "mosaic-variants"],
                        default="core")  # fmt: skip
    parser.add_argument("--reuse-profiles", action="store_true",
                        help="one outlier profile per (allocation class, threshold, draw); see ProfileCache")
    parser.add_argument("--draws", type=int, default=1,
                        help="calibration draws per row (seeds 0..N-1; held-out windows fixed): cells report the "
                             "mean, min and max")  # fmt: skip
    parser.add_argument("--allocations", nargs="*", default=None, help="only rows with these allocations")
    parser.add_argument("--methods", nargs="*", default=None, help="only rows with these methods")
    parser.add_argument("--sparsities", nargs="*", type=float, default=None, help="only rows at these sparsities")
    parser.add_argument("--true-sequential", action="store_true",
                        help="every row calibrates true-sequentially (each projection from its pruned predecessors)")
    parser.add_argument("--msp-args", default=None, help="MSP arguments as JSON, e.g. '{\"population\": 4}'")
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="lm-eval tasks scored on dense and every row, e.g. social_iqa_local strategyqa_local")
    parser.add_argument("--task-limit", type=int, default=500, help="items per task (lm-eval's limit)")
    parser.add_argument("--out", default="bench/out/quality.json")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws={args.draws}; must be >= 1")
    if args.true_sequential and args.suite in ("order", "sequential"):
        parser.error(f"--true-sequential with --suite {args.suite}: that suite sets each row's calibration order")
    return args


def main() -> None:
    args = parse_args()
    if args.table:
        print(spread_table(args.table))
        return

    cpu_start, wall_start = time.process_time(), time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(BUNDLED_MODEL)
    draws = [calibration_and_heldout(tokenizer, args.calibration_samples, args.eval_windows, args.seq_len, seed)
             for seed in range(args.draws)]  # fmt: skip
    evaluation = draws[0][1]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(results: list[dict]) -> None:  # after every row, so a cut-short campaign keeps what it measured
        out.write_text(json.dumps({
            "args": vars(args), "cpu_s": time.process_time() - cpu_start, "wall_s": time.perf_counter() - wall_start,
            "cells": spread(results), "results": results,
        }, indent=2))  # fmt: skip

    accuracy = _accuracy_scorer(args.tasks, args.task_limit, tokenizer)
    dense = load_causal_lm(BUNDLED_MODEL)
    results = [{"method": "dense", "allocation": "-", "sparsity": 0.0, "pattern": "-",
                "ppl": perplexity(dense, evaluation, progress=False), **accuracy(dense)}]  # fmt: skip
    del dense
    print(json.dumps(results[0]), flush=True)
    profiles = ProfileCache() if args.reuse_profiles else None
    runs = [(seed, calibration, config) for seed, (calibration, _) in enumerate(draws) for config in configs(args)]
    for seed, calibration, config in runs:
        model = load_causal_lm(BUNDLED_MODEL)
        clock = time.perf_counter()
        outcome = prune_model(model, calibration, config, progress=False)
        requested = {t: [p.requested_sparsity for p in outcome.report.projections if p.name == t] for t in TYPES}
        row = {
            "method": config.method.label,
            "allocation": config.allocation.label,
            "variant": variant(config.allocation),
            "allocation_args": config.allocation.to_config()["init_args"],
            "seed": seed,
            "sparsity": config.sparsity,
            "pattern": config.pattern,
            "structured_fraction": config.structured_fraction,
            "sequential": config.sequential,
            "true_sequential": config.true_sequential,
            "achieved_sparsity": outcome.report.achieved_sparsity,
            "structured_share": outcome.report.structured_params_removed / outcome.report.params_targeted,
            "prune_s": time.perf_counter() - clock,
            "ppl": perplexity(model, evaluation, progress=False),
            "wall_s": time.perf_counter() - clock,  # prune + held-out perplexity
            # Mean requested sparsity per projection type (and per layer below): where the allocation moved budget.
            "type_sparsity": {t: sum(v) / len(v) for t, v in requested.items() if v},
            "layer_sparsity": _layer_means(outcome.report),
            "allocation_details": {k: v for k, v in outcome.report.allocation.items() if k != "population"},
        }
        row.update(profiles.take() if profiles else {})
        row.update(accuracy(model))
        if outcome.structure:  # the physically smaller model: parameters after compaction
            compact_model(model, outcome.structure)
            row["params_compacted"] = sum(p.numel() for p in model.parameters())
        if outcome.report.save_search_plot(pathlib.Path(args.out).with_suffix(f".{row['method']}-search.png")):
            row["search_png"] = str(pathlib.Path(args.out).with_suffix(f".{row['method']}-search.png"))
        results.append(row)
        print(json.dumps(row), flush=True)
        write(results)

    print(f"\ncalibration {args.calibration_samples} x {args.seq_len} tokens, eval {args.eval_windows} x "
          f"{args.seq_len} tokens (held-out articles)")  # fmt: skip
    print(
        f"{'method':<10} {'allocation':<9} {'setting':<8} {'sequential':>10} {'achieved':>9} {'structural':>10} "
        f"{'ppl':>10} {'prune s':>8}"
    )
    for r in results:
        setting = "dense" if r["method"] == "dense" else (f"{r['sparsity']:.0%}" if r["pattern"] == "unstructured"
                                                          else r["pattern"])  # fmt: skip
        achieved = f"{r.get('achieved_sparsity', 0):.4f}"
        structural = f"{r.get('structured_share', 0):.4f}"
        sequential = "true" if r.get("true_sequential") else str(r.get("sequential", "-"))
        label = r.get("variant", r["allocation"])
        print(f"{r['method']:<10} {label:<9} {setting:<8} {sequential:>10} {achieved:>9} {structural:>10} "
              f"{r['ppl']:>10.3f} {r.get('prune_s', 0):>8.1f}")  # fmt: skip
    if args.draws > 1 or args.suite == "mosaic-variants":
        print(f"\nperplexity over {args.draws} calibration draw(s) (seeds 0..{args.draws - 1}), held-out windows fixed")
        print(f"{'method':<10} {'allocation':<24} {'setting':<8} {'mean':>10} {'min':>10} {'max':>10} {'wall s':>16}")
        for c in spread(results):
            walls = "/".join(f"{w:.0f}" for w in c["wall_s"])
            print(f"{c['method']:<10} {c['allocation']:<24} {c['sparsity']:<8.0%} {c['ppl_mean']:>10.3f} "
                  f"{c['ppl_min']:>10.3f} {c['ppl_max']:>10.3f} {walls:>16}")  # fmt: skip
    if args.tasks:
        print(f"\nlm-eval, {args.task_limit} items per task (acc / acc_norm, ± standard error)")
        for r in results:
            cells = [f"{task} {m} {metric_cell(v.get(m), v.get(m + '_stderr'))}"
                     for task, v in r["tasks"].items() for m in ("acc", "acc_norm")]  # fmt: skip
            print(f"{r['method']:<10} {r['allocation']:<9} {r['sparsity']:.0%} f={r.get('structured_fraction', 0)}  "
                  + "  ".join(cells))
    write(results)
    print(f"\ncampaign: {time.process_time() - cpu_start:.0f} s CPU (this process, all threads), "
          f"{time.perf_counter() - wall_start:.0f} s wall")  # fmt: skip


if __name__ == "__main__":
    main()
