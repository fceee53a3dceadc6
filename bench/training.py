"""Training-integrated pruning on the real model, through the shipped recipes (CPU budget, short sequences).

    python bench/training.py --steps 60 --eval-windows 200 --out bench/out/training.json

Runs, all at ``seq_len`` 128 with the same evaluation windows (held-out Wikipedia):
  * ``oneshot-50``: Mosaic 50% one-shot, no training (the gap LoRA should close);
  * ``lora-50``: the same, then ``--steps`` steps of LoRA recovery and the sparsity-keeping merge;
  * ``oneshot-80``, ``gradual-80``, ``admm-80``: 80% with the same step budget: one-shot then fine-tuning with
    masks held; gradual cubic ramp 30% -> 80% over the first two thirds; ADMM for the first three quarters,
    hard prune, then masked fine-tuning.
Each run's export is re-read: the zeros in its projection weights are counted, not taken from the report.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

RUNS = {
    "oneshot-50": ("mosaic-50-lora.yaml", ["--trainer.max_steps", "0"]),
    "lora-50": ("mosaic-50-lora.yaml", []),
    "oneshot-80": ("mosaic-70.yaml", ["--pruning.sparsity", "0.8", "--model.learning_rate", "5e-5"]),
    "gradual-80": ("mosaic-gradual-70.yaml", ["--pruning.sparsity", "0.8"]),
    "admm-80": ("admm-80.yaml", []),
}


def _schedule_args(name: str, steps: int) -> list[str]:
    if name == "gradual-80":
        end = max(2 * steps // 3, 2)
        return ["--pruning.schedule.init_args.end_step", str(end),
                "--pruning.schedule.init_args.every_n_steps", str(max(end // 4, 1))]  # fmt: skip
    if name == "admm-80":
        end = max(3 * steps // 4, 2)
        return ["--pruning.schedule.init_args.end_step", str(end),
                "--pruning.schedule.init_args.projection_every", str(max(end // 6, 1))]  # fmt: skip
    return []


def _zero_fraction(export: pathlib.Path) -> float:
    state = load_file(export / "model.safetensors")
    weights = [t for n, t in state.items() if n.endswith("proj.weight")]
    return sum(int((t == 0).sum()) for t in weights) / sum(t.numel() for t in weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-windows", type=int, default=200)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--work", default="bench/out/training")
    parser.add_argument("--out", default="bench/out/training.json")
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.runs.split(","):
        recipe, extra = RUNS[name]
        export = work / name
        shutil.rmtree(export, ignore_errors=True)
        steps = [] if "--trainer.max_steps" in extra else ["--trainer.max_steps", str(args.steps)]
        cmd = [sys.executable, "train.py", "fit", "--config", f"recipes/{recipe}", "--data.seq_len", "128",
               "--data.max_eval_windows", str(args.eval_windows),
               "--data.num_calibration_samples", str(args.calibration_samples),
               "--export_dir", str(export), "--trainer.logger", "false",
               *steps, *extra, *_schedule_args(name, args.steps)]  # fmt: skip
        clock = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=(work / f"{name}.log").open("w"))
        report = json.loads((export / "pruning_report.json").read_text())
        results[name] = {
            "command": " ".join(cmd[1:]),
            "wall_s": time.perf_counter() - clock,
            "ppl_dense": report["ppl_dense"],
            "ppl": report["ppl_pruned"],
            "achieved_sparsity": report["achieved_sparsity"],
            "zero_fraction_counted": _zero_fraction(export),
        }
        print(json.dumps({name: results[name]}), flush=True)
    print(f"\n{args.steps} steps of 4 x 128 tokens, eval {args.eval_windows} x 128 held-out tokens, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'run':<12} {'ppl':>10} {'dense':>8} {'achieved':>9} {'zeros counted':>14} {'wall s':>7}")
    for name, r in results.items():
        print(f"{name:<12} {r['ppl']:>10.2f} {r['ppl_dense']:>8.2f} {r['achieved_sparsity']:>9.4f} "
              f"{r['zero_fraction_counted']:>14.6f} {r['wall_s']:>7.0f}")  # fmt: skip
    if {"oneshot-50", "lora-50"} <= results.keys():
        before, after, dense = results["oneshot-50"]["ppl"], results["lora-50"]["ppl"], results["lora-50"]["ppl_dense"]
        closed = (before - after) / (before - dense)
        results["lora_gap_closed"] = closed
        print(f"LoRA recovery closes {100 * closed:.1f}% of the perplexity gap to dense")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
