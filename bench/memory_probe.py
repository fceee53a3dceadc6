"""Peak host memory (VmHWM) of one step on its own, in a fresh process: loading an export, or MSP's Fisher pass.

    python bench/memory_probe.py load-pruned bench/out/models/structprune-30-compacted
    python bench/memory_probe.py fisher --sequences 1

``load-pruned``: ``load_pruned(dir)``, then every weight touched (summed), so pages not yet read count too.
``fisher``: ``fisher_trace`` of the bundled model on the first 8 of 32 x 512 calibration windows (bench/speed.py's),
one backward per batch of 4 sequences, or per ``--sequences`` sequences. Prints seconds and VmHWM before/after.
"""

from __future__ import annotations

import argparse
import time

import torch
from inference import _peak_rss_mb  # VmHWM: this process's own peak, not a parent's


def _load_pruned(directory: str) -> str:
    from mosaic_lightning import load_pruned

    model = load_pruned(directory, dtype=torch.float32)
    with torch.no_grad():
        sum(float(p.double().sum()) for p in model.parameters())
    return f"{sum(p.numel() for p in model.parameters()):,} parameters"


def _fisher(sequences: int | None) -> str:
    from speed import _calibration

    from mosaic_lightning.allocation import AllocationContext
    from mosaic_lightning.allocation.msp import fisher_trace
    from mosaic_lightning.core.adapters import ModelAdapter
    from mosaic_lightning.core.assets import BUNDLED_MODEL, load_causal_lm

    model = load_causal_lm(BUNDLED_MODEL).eval()
    context = AllocationContext(model, ModelAdapter(model), _calibration(32, 512), progress=False)
    fisher_trace(context, list(range(len(model.model.layers))), 8, sequences)
    return f"fisher_sequences={sequences}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    sub.add_parser("load-pruned").add_argument("directory")
    sub.add_parser("fisher").add_argument("--sequences", type=int, default=None)
    args = parser.parse_args()
    before, clock = _peak_rss_mb(), time.perf_counter()
    what = _load_pruned(args.directory) if args.probe == "load-pruned" else _fisher(args.sequences)
    print(f"{args.probe} ({what}): {time.perf_counter() - clock:.0f} s, VmHWM {before:.0f} -> {_peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
