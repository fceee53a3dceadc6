"""Pruning speed and peak memory on the real model: methods (and allocations) at 50% vs one plain forward pass.

    python bench/speed.py --calibration-samples 128 --seq-len 512 --repeats 3 --out bench/out/speed.json
    python bench/speed.py --kinds forward,sparsegpt,sparsellm,wanda,wanda@msp --out bench/out/speed-methods.json

A kind is a method (``wanda``), optionally ``-dense`` (non-sequential) or ``-ts`` (true-sequential: each
projection calibrated with the ones before it pruned, about one pass per block), and ``@allocation`` (default
uniform; ``structprune`` runs structured only, as its recipe: ``structprune@energy``);
``stream:`` before it prunes streamed from the bundled model's safetensors file into a temporary export
(``prune_streamed``: its time includes reading the blocks and writing the export shards).

    python bench/speed.py --kinds forward,wanda,stream:wanda --calibration-samples 32 --repeats 2 \
        --out bench/out/speed-stream.json

``forward`` is one plain forward pass of the full model (logits included) over the calibration batches as the
pruner gets them (4 sequences each); ``forward1`` the same tokens one sequence at a time (the baseline
"batch 1, full model"). Both ratios are printed where both kinds ran.

Each measurement runs in a fresh subprocess so that its peak RSS is its own. Times exclude model loading.
The lower bound for a calibration-based pruner is one forward pass over the calibration tokens; the ratio
``wanda / forward`` is measured within one run (interleaved repeats, medians), so machine noise cancels.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import torch


def _calibration(samples: int, seq_len: int) -> list[torch.Tensor]:
    from mosaic_lightning.core.assets import BUNDLED_MODEL, load_tokenizer, wikipedia_split
    from mosaic_lightning.lit.data import TokenWindows

    train, _ = wikipedia_split()
    ids = load_tokenizer(BUNDLED_MODEL)("\n\n".join(train), add_special_tokens=False)["input_ids"]
    windows = TokenWindows(torch.tensor(ids), seq_len).windows
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    return list(windows[order[:samples]].split(4))


def measure(kind: str, samples: int, seq_len: int) -> dict:
    """One measurement in this process: seconds and peak RSS."""
    from mosaic_lightning import prune_model
    from mosaic_lightning.core.assets import BUNDLED_MODEL, load_causal_lm

    batches = _calibration(samples, seq_len)
    if kind.startswith("stream:"):
        return _measure_streamed(kind, batches)
    model = load_causal_lm(BUNDLED_MODEL).eval()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    clock = time.perf_counter()
    if kind in ("forward", "forward1"):
        with torch.no_grad():
            for ids in batches if kind == "forward" else [row[None] for batch in batches for row in batch]:
                model(input_ids=ids, use_cache=False)
    else:
        prune_model(model, batches, _config(kind), progress=False)
    seconds = time.perf_counter() - clock
    return {
        "kind": kind,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_before,
    }


def _config(kind: str):
    """``wanda-dense``: non-sequential; ``wanda-ts``: true-sequential; ``wanda@msp``: that allocation."""
    from mosaic_lightning import PruningConfig

    spec, _, allocation = kind.removeprefix("stream:").partition("@")
    method, _, variant = spec.partition("-")
    if variant not in ("", "dense", "ts"):
        raise SystemExit(f"kind {kind!r}: variant {variant!r}; allowed: dense, ts")
    structured = 1.0 if method == "structprune" else 0.0  # StructPrune removes whole units only
    return PruningConfig(0.5, method, allocation or "uniform", sequential=variant != "dense",
                         true_sequential=variant == "ts", structured_fraction=structured)  # fmt: skip


def _measure_streamed(kind: str, batches: list[torch.Tensor]) -> dict:
    import tempfile

    from mosaic_lightning.core.assets import ensure_bundled_fp32
    from mosaic_lightning.streaming.job import prune_streamed

    source = ensure_bundled_fp32()
    config = _config(kind)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as folder:
        clock = time.perf_counter()
        prune_streamed(source, torch.float32, config, batches, pathlib.Path(folder) / "export", progress=False)
        seconds = time.perf_counter() - clock
    return {"kind": kind, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": rss_before}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--kinds", default="forward,wanda,wanda-dense,sparsegpt")
    parser.add_argument("--out", default="bench/out/speed.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.calibration_samples, args.seq_len)))
        return

    runs: list[dict] = []
    for _ in range(args.repeats):
        for kind in args.kinds.split(","):
            cmd = [sys.executable, __file__, "--measure", kind, "--calibration-samples",
                   str(args.calibration_samples), "--seq-len", str(args.seq_len)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for kind in args.kinds.split(","):
        mine = [r for r in runs if r["kind"] == kind]
        summary[kind] = {
            "median_s": statistics.median(r["seconds"] for r in mine),
            "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
            "median_rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in mine),
        }
    tokens = args.calibration_samples * args.seq_len
    print(f"\ncalibration {args.calibration_samples} x {args.seq_len} = {tokens} tokens, {args.repeats} repeat(s), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'kind':<16} {'median s':>9} {'x forward':>10} {'x forward1':>11} {'peak RSS MB':>12} "
          f"{'RSS after load':>15}")  # fmt: skip
    for kind, s in summary.items():
        for base in ("forward", "forward1"):
            s[f"ratio_to_{base}"] = s["median_s"] / summary[base]["median_s"] if base in summary else float("nan")
        print(f"{kind:<16} {s['median_s']:>9.1f} {s['ratio_to_forward']:>10.2f} {s['ratio_to_forward1']:>11.2f} "
              f"{s['median_peak_rss_mb']:>12.0f} {s['median_rss_after_load_mb']:>15.0f}")  # fmt: skip
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "tokens": tokens, "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
