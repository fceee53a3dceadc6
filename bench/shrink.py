"""Smaller, faster, not dumber: structure removed, compacted, recovered by distillation, against dense.

    python bench/shrink.py --steps 200 --val-every 25 --out bench/out/shrink.json

Every run goes through the CLI with one protocol: ``recipes/shrink-30.yaml``'s data (512-token windows for
calibration, training and evaluation, batch 4: 2,048 training tokens per step, ``--steps`` steps), its optimizer
(Adam (0.9, 0.95), lr ``--learning-rate`` (1e-4) decaying linearly, clip 1.0) and the same held-out windows
(``--eval-windows``, never trained on: the last articles of the bundled text). Rows:

  * ``uniform-30``: the shipped recipe (StructPrune units, the same sizes in every layer, plain from_pretrained);
  * ``uniform-30-mlp``: the same with MLP channels only (heads against channels);
  * ``per-layer-30``: StructPrune with its energy allocation (per-layer sizes, read by ``load_pruned``);
  * ``dense-ft``: the dense model fine-tuned on the LM loss for the same tokens (training on this text lowers
    even dense perplexity: the fair reference for a recovered model);
  * ``unstructured-50``: 50% SparseGPT zeros recovered by distillation for the same tokens (better perplexity,
    no speed: the zeros stay in place);
  * ``uniform-20`` / ``uniform-40`` / ``per-layer-20`` / ``per-layer-40`` (``--one-shot``): the shape of the
    trade-off, one-shot only.

A recovered run's report holds its one-shot perplexity too (``ppl_compacted``: right after compaction), and its
validation curve (every ``--val-every`` steps) gives the smaller budgets. Each export's speed is then measured
by ``bench/inference.py --measure`` in fresh processes, the exports interleaved with dense, medians of
``--repeats``: decode tokens/s at batch 1 and 8, prefill tokens/s, peak RSS; file size and parameters from disk.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys

from recovery import curve  # bench/ is on the path when a bench script runs

TOKENS_PER_STEP = 4 * 512
SHRINK = ["--config", "recipes/shrink-30.yaml"]
PER_LAYER = [*SHRINK, "--pruning.allocation", "energy",
             "--pruning.uniform_structure", "false"]  # fmt: skip
RUNS = {
    "uniform-30": SHRINK,
    "uniform-30-mlp": [*SHRINK, "--pruning.structured_units", "[mlp]"],
    "per-layer-30": PER_LAYER,
    "dense-ft": ["--config", "recipes/recover-70.yaml", "--pruning.sparsity", "0.0", "--pruning.method", "magnitude",
                 "--model.distill_weight", "0.0"],
    "unstructured-50": ["--config", "recipes/recover-70.yaml", "--pruning.sparsity", "0.5",
                        "--model.distill_weight", "1.0"],
}  # fmt: skip
ONE_SHOT = {f"{name}-{p}": [*RUNS[f"{name}-30"], "--pruning.sparsity", f"0.{p // 10}"]
            for name in ("uniform", "per-layer") for p in (20, 40)}  # fmt: skip
PROTOCOL = ["--data.seq_len", "512", "--data.batch_size", "4",
            "--model.betas", "[0.9, 0.95]", "--model.lr_schedule", "linear", "--trainer.gradient_clip_val", "1.0"]


def _command(name: str, args, work: pathlib.Path, steps: int) -> list[str]:
    recipe = RUNS.get(name) or ONE_SHOT[name]
    cmd = [sys.executable, "train.py", "fit", *recipe, *PROTOCOL, "--model.learning_rate", str(args.learning_rate),
           "--data.max_eval_windows", str(args.eval_windows),
           "--data.num_calibration_samples", str(args.calibration), "--trainer.max_steps", str(steps),
           "--trainer.logger.class_path", "lightning.pytorch.loggers.CSVLogger",
           "--trainer.logger.init_args.save_dir", str(work / name / "logs"),
           "--export_dir", str(work / name / "export")]  # fmt: skip
    if steps:
        cmd += ["--trainer.limit_val_batches", str(args.eval_windows // 4), "--trainer.val_check_interval",
                str(args.val_every), "--trainer.log_every_n_steps", str(args.val_every)]  # fmt: skip
    return cmd


def _train(name: str, args, work: pathlib.Path) -> dict:
    steps = 0 if name in ONE_SHOT else args.steps
    shutil.rmtree(work / name, ignore_errors=True)
    (work / name).mkdir(parents=True)
    cmd = _command(name, args, work, steps)
    timing = work / name / "time.txt"
    with (work / name / "run.log").open("w") as log:
        subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(timing), *cmd], check=True, stdout=log,
                       stderr=subprocess.STDOUT)  # fmt: skip
    wall, rss_kb = timing.read_text().split()[-2:]
    report = json.loads((work / name / "export" / "pruning_report.json").read_text())
    return {"command": " ".join(cmd[1:]), "train_tokens": steps * TOKENS_PER_STEP, "learning_rate": args.learning_rate,
            "ppl_dense": report["ppl_dense"],
            "ppl_one_shot": report.get("ppl_compacted"), "ppl": report["ppl_pruned"],
            "achieved_sparsity": report["achieved_sparsity"], "structure_kept": _kept(report),
            "run_wall_s": float(wall), "run_peak_rss_mb": int(rss_kb) / 1024,
            "curve": curve(work / name / "logs", TOKENS_PER_STEP), "export": str(work / name / "export")}  # fmt: skip


def _kept(report: dict) -> dict:
    return {k: v for k, v in report.items() if k.startswith("kept_") or k.startswith("params_")}


def _speed(exports: dict[str, str], repeats: int) -> dict[str, dict]:
    """Fresh-process inference figures per export, interleaved with dense, medians over ``repeats``."""
    runs: dict[str, list[dict]] = {name: [] for name in ["dense", *exports]}
    for _ in range(repeats):
        for name in runs:
            kind = "dense" if name == "dense" else exports[name]
            out = subprocess.run([sys.executable, "bench/inference.py", "--measure", kind], capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    metrics = ["prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "peak_rss_mb"]
    summary = {name: {m: statistics.median(r[m] for r in rs) for m in metrics} | {"params": rs[0]["params"]}
               for name, rs in runs.items()}  # fmt: skip
    for name, path in {"dense": None, **exports}.items():
        folder = pathlib.Path(path) if path else None
        summary[name]["file_mb"] = (sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
                                    if folder else None)  # fmt: skip
        summary[name]["x_dense"] = {m: summary[name][m] / summary["dense"][m] for m in metrics}
    return summary


def _table(results: dict, speed: dict) -> str:
    lines = ["| row | train tokens | one-shot ppl | ppl | params | file MB | decode b1 x | decode b8 x | prefill x | "
             "inference peak MB | run s | run peak GB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, r in results.items():
        s = speed.get(name, {})
        ratios = s.get("x_dense", {})
        one_shot = f"{r['ppl_one_shot']:.2f}" if r.get("ppl_one_shot") else "-"
        lines.append(f"| {name} | {r['train_tokens']:,} | {one_shot} | {r['ppl']:.2f} | {s.get('params', 0):,} | "
                     f"{s.get('file_mb') or 0:.0f} | {ratios.get('decode_b1_tok_s', 0):.2f} | "
                     f"{ratios.get('decode_b8_tok_s', 0):.2f} | {ratios.get('prefill_tok_s', 0):.2f} | "
                     f"{s.get('peak_rss_mb', 0):,.0f} | {r['run_wall_s']:,.0f} | "
                     f"{r['run_peak_rss_mb'] / 1024:.1f} |")  # fmt: skip
    return "\n".join(lines)


def _curve_table(results: dict) -> str:
    """Held-out perplexity of every recovered row at each validation point (training tokens)."""
    recovered = {name: dict(r["curve"]) for name, r in results.items() if r["curve"]}
    tokens = sorted({t for points in recovered.values() for t in points})
    lines = ["| row | " + " | ".join(f"{t // 1000}k" for t in tokens) + " |",
             "| --- |" + " ---: |" * len(tokens)]  # fmt: skip
    for name, points in recovered.items():
        cells = [f"{points[t]:.2f}" if t in points else "-" for t in tokens]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of the recovered rows")
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-4,
                        help="peak learning rate of the recovered rows (decays linearly to 0 over --steps)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"from {', '.join([*RUNS, *ONE_SHOT])}")
    parser.add_argument("--repeats", type=int, default=3, help="speed repeats per export")
    parser.add_argument("--measure", default=None, help="rows whose exports are timed, comma-separated (default: all)")
    parser.add_argument("--work", default="bench/out/shrink")
    parser.add_argument("--out", default="bench/out/shrink.json")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="earlier outputs whose rows join this run's (train one row a call, measure at the end)")
    args = parser.parse_args()
    names = args.runs.split(",") if args.runs else []
    unknown = sorted(set(names) - set(RUNS) - set(ONE_SHOT))
    if unknown:
        raise SystemExit(f"--runs: unknown {unknown}; allowed: {', '.join([*RUNS, *ONE_SHOT])}")
    work = pathlib.Path(args.work)
    results = {}
    for earlier in args.merge:
        results.update(json.loads(pathlib.Path(earlier).read_text())["results"])
    for name in names:
        results[name] = _train(name, args, work)
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "curve"}}), flush=True)
    timed = args.measure.split(",") if args.measure is not None else list(results)
    unknown = sorted(set(timed) - set(results))
    if unknown:
        raise SystemExit(f"--measure: no such rows {unknown}; rows here: {', '.join(results)}")
    speed = _speed({n: results[n]["export"] for n in timed}, args.repeats) if args.repeats else {}
    print(_table(results, speed))
    print(_curve_table(results))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "speed": speed}, indent=2))


if __name__ == "__main__":
    main()
