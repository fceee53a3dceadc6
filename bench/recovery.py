"""Budgeted recovery comparison on the real model: which recipe gives the best model at a sparsity, for the same
number of training tokens.

    python bench/recovery.py --sparsity 0.7 --steps 100 --out bench/out/recovery-70.json

Every run goes through the CLI (``train.py fit``) with the same data (seq_len 128, batch 4: 512 tokens per
optimizer step, ``--steps`` steps), the same optimizer (Elsa's: Adam (0.9, 0.95), lr 2e-4 decaying linearly to
0, clip 1.0) and the same held-out evaluation; only the recipe differs:

  * ``oneshot``: SparseGPT, uniform, no training;
  * ``oneshot+ft``: the same, then masked fine-tuning on the LM loss;
  * ``oneshot+kd``: the same, then masked fine-tuning on distillation from the dense model (``distill_weight 1``);
  * ``oneshot+lora``: the same, then LoRA (r 8) and the sparsity-keeping merge;
  * ``gradual``: Wanda re-scored on a cubic ramp from 30% over the first two thirds, then masked fine-tuning;
  * ``admm``: Elsa's ADMM (``recipes/admm-80.yaml`` at ``--sparsity``), hard-pruned at the last step.

Perplexity on held-out windows is logged through Lightning's CSVLogger every ``--val-every`` steps (the
validation loop on the pruned, training model; for ADMM the model is dense until its final hard prune, for
gradual it is at the ramp's current sparsity) and plotted against training tokens. Wall time and peak RSS come
from ``/usr/bin/time`` around each run.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import shutil
import subprocess
import sys

TOKENS_PER_STEP = 4 * 128
ONESHOT = ["--config", "recipes/mosaic-70.yaml", "--pruning.allocation", "uniform"]
RUNS = {
    "oneshot": ONESHOT,
    "oneshot+ft": ONESHOT,
    "oneshot+kd": [*ONESHOT, "--model.distill_weight", "1.0"],
    "oneshot+lora": ["--config", "recipes/mosaic-50-lora.yaml", "--pruning.allocation", "uniform",
                     "--pruning.method", "sparsegpt"],
    "gradual": ["--config", "recipes/mosaic-gradual-70.yaml", "--pruning.allocation", "uniform"],
    "admm": ["--config", "recipes/admm-80.yaml"],
}  # fmt: skip


def _command(name: str, args, work: pathlib.Path) -> list[str]:
    steps = 0 if name == "oneshot" else args.steps
    cmd = [sys.executable, "train.py", "fit", *RUNS[name], "--pruning.sparsity", str(args.sparsity),
           "--data.seq_len", "128", "--data.batch_size", "4", "--data.num_calibration_samples", "128",
           "--data.max_eval_windows", str(args.eval_windows), "--trainer.max_steps", str(steps),
           "--model.learning_rate", "2e-4", "--model.betas", "[0.9, 0.95]", "--model.lr_schedule", "linear",
           "--trainer.gradient_clip_val", "1.0",
           "--trainer.logger.class_path", "lightning.pytorch.loggers.CSVLogger",
           "--trainer.logger.init_args.save_dir", str(work / name / "logs"),
           "--export_dir", str(work / name / "export")]  # fmt: skip
    if steps:
        cmd += ["--trainer.limit_val_batches", str(args.eval_windows // 4), "--trainer.val_check_interval",
                str(args.val_every), "--trainer.log_every_n_steps", str(args.val_every)]  # fmt: skip
    if name == "gradual":
        end = max(2 * steps // 3, 2)
        cmd += ["--pruning.schedule.init_args.end_step", str(end),
                "--pruning.schedule.init_args.every_n_steps", str(max(end // 4, 1))]  # fmt: skip
    return cmd


def curve(logs: pathlib.Path, tokens_per_step: int = TOKENS_PER_STEP) -> list[tuple[int, float]]:
    """(training tokens, val_ppl) from the run's CSVLogger metrics (also read by bench/shrink.py)."""
    files = sorted(logs.glob("**/metrics.csv"))
    if not files:
        return []
    with files[-1].open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val_ppl")]
    return [((int(r["step"]) + 1) * tokens_per_step, float(r["val_ppl"])) for r in rows]


def _run(name: str, args, work: pathlib.Path) -> dict:
    shutil.rmtree(work / name, ignore_errors=True)
    (work / name).mkdir(parents=True)
    cmd = _command(name, args, work)
    timing = work / name / "time.txt"
    with (work / name / "run.log").open("w") as log:
        subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(timing), *cmd], check=True, stdout=log,
                       stderr=subprocess.STDOUT)  # fmt: skip
    wall, rss_kb = timing.read_text().split()[-2:]
    report = json.loads((work / name / "export" / "pruning_report.json").read_text())
    steps = 0 if name == "oneshot" else args.steps
    return {
        "command": " ".join(cmd[1:]),
        "train_tokens": steps * TOKENS_PER_STEP,
        "ppl_dense": report["ppl_dense"],
        "ppl": report["ppl_pruned"],
        "achieved_sparsity": report["achieved_sparsity"],
        "wall_s": float(wall),
        "peak_rss_mb": int(rss_kb) / 1024,
        "curve": curve(work / name / "logs"),
    }


def _plot(results: dict, path: pathlib.Path, sparsity: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        points = r["curve"] + [(r["train_tokens"], r["ppl"])]
        ax.plot([t for t, _ in points], [p for _, p in points], marker="o", label=name)
    dense = next(iter(results.values()))["ppl_dense"]
    ax.axhline(dense, color="grey", linestyle="--", label=f"dense {dense:.1f}")
    ax.axhline(3 * dense, color="grey", linestyle=":", label="3x dense")
    ax.set(xlabel="training tokens", ylabel="held-out perplexity (log)", yscale="log",
           title=f"SmolLM2-135M at {sparsity:.0%}: recovery for the same token budget")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _earlier(args) -> dict:
    """The results of ``--add-to``, refused if that run had another budget (its rows would not compare)."""
    earlier = json.loads(pathlib.Path(args.add_to).read_text())
    for key in ("sparsity", "steps", "eval_windows"):
        if earlier["args"][key] != getattr(args, key):
            raise SystemExit(f"--add-to {args.add_to}: {key}={earlier['args'][key]} there, {getattr(args, key)} here")
    return {name: r for name, r in earlier["results"].items() if name not in args.runs.split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--work", default="bench/out/recovery")
    parser.add_argument("--out", default="bench/out/recovery.json")
    parser.add_argument("--add-to", default=None,
                        help="an earlier run's JSON (same budget): its recipes join the table and the plot")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = _earlier(args) if args.add_to else {}
    for name in args.runs.split(","):
        results[name] = _run(name, args, pathlib.Path(args.work))
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "command"}}), flush=True)
        out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))  # partial results survive
    _plot(results, out.with_suffix(".png"), args.sparsity)
    print(f"\n{args.sparsity:.0%}, {args.steps} steps x {TOKENS_PER_STEP} tokens, eval {args.eval_windows} x 128")
    print(f"{'run':<13} {'ppl':>10} {'x dense':>8} {'tokens':>8} {'wall s':>7} {'peak RSS MB':>12}")
    for name, r in results.items():
        print(f"{name:<13} {r['ppl']:>10.2f} {r['ppl'] / r['ppl_dense']:>8.2f} {r['train_tokens']:>8} "
              f"{r['wall_s']:>7.0f} {r['peak_rss_mb']:>12.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
