"""bfloat16 against float32 on the real model, from the CLI's own exports: perplexity, exact sparsity, the export's
dtype, and how far the two runs' masks agree.

Run the recipes with ``--model.dtype`` both ways into ``<runs>/<recipe>-<dtype>`` (as in bench/RESULTS.md,
"bfloat16 and float32"), then

    python bench/dtypes.py --runs /tmp/dtruns --recipes sparsegpt-50 wanda-50 --out bench/out/dtypes.json

For each recipe and dtype it reads the export's ``pruning_report.json`` (requested and achieved sparsity, dense and
pruned held-out perplexity) and its safetensors headers (the projections' dtype), and from the weights themselves
the pruned set of every targeted projection (its zeros) to compare bf16 with fp32: the share of mask entries that
agree and the share of fp32's zeros that bf16 has too. The dense SmolLM2 already holds 33,483 exact zeros in these
weights (0.03%, from its 4-bit quantisation; its smallest non-zero magnitude, 3.8e-6, survives bf16 rounding); a
score-based method prunes them first, so where the export's zero share equals the achieved sparsity (it did, exactly,
for Wanda and SparseGPT at 50%) the zero sets are exactly the pruned sets.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

import torch
from safetensors import safe_open

PROJECTIONS = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def _projection_zeros(folder: pathlib.Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    zeros, dtypes = {}, set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles have keys(), no iteration
                if PROJECTIONS.search(name):
                    tensor = handle.get_tensor(name)
                    dtypes.add(str(tensor.dtype).removeprefix("torch."))
                    zeros[name] = tensor == 0
    return zeros, dtypes


def summarise(runs: pathlib.Path, recipe: str) -> dict:
    out = {}
    zeros = {}
    for dtype in ("float32", "bfloat16"):
        folder = runs / f"{recipe}-{dtype}"
        report_file = folder / "pruning_report.json"
        if not report_file.exists():
            out[dtype] = {"missing": str(folder)}
            continue
        report = json.loads(report_file.read_text())
        zeros[dtype], weight_dtypes = _projection_zeros(folder)
        counted = sum(int(z.sum()) for z in zeros[dtype].values()) / sum(z.numel() for z in zeros[dtype].values())
        out[dtype] = {
            "requested_sparsity": report["requested_sparsity"],
            "achieved_sparsity": report["achieved_sparsity"],
            "zero_fraction_in_export": counted,
            "projection_dtypes": sorted(weight_dtypes),
            "ppl_dense": report.get("ppl_dense"),
            "ppl_pruned": report.get("ppl_pruned"),
            "calibration": report.get("calibration"),
            "prune_s": report.get("timings_s", {}).get("prune"),
        }
    if len(zeros) == 2:
        a, b = zeros["bfloat16"], zeros["float32"]
        equal = sum(int((a[n] == b[n]).sum()) for n in b) / sum(b[n].numel() for n in b)
        both = sum(int((a[n] & b[n]).sum()) for n in b) / max(sum(int(b[n].sum()) for n in b), 1)
        ppl_b, ppl_f = out["bfloat16"]["ppl_pruned"], out["float32"]["ppl_pruned"]
        out["agreement"] = {"mask_entries_equal": equal, "fp32_pruned_also_pruned_in_bf16": both,
                            "ppl_pruned_bf16_over_fp32": ppl_b / ppl_f if ppl_b and ppl_f else None}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="/tmp/dtruns", help="folder holding <recipe>-<dtype> export directories")
    parser.add_argument("--recipes", nargs="+", default=["sparsegpt-50", "wanda-50"])
    parser.add_argument("--out", default="bench/out/dtypes.json")
    args = parser.parse_args()
    results = {recipe: summarise(pathlib.Path(args.runs), recipe) for recipe in args.recipes}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| recipe | dtype | export projections | achieved sparsity | zeros in export | ppl dense | ppl pruned | "
          "masks agree | fp32 zeros also bf16 zeros |")
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe, result in results.items():
        agreement = result.get("agreement", {})
        for dtype in ("float32", "bfloat16"):
            r = result[dtype]
            if "missing" in r:
                print(f"| {recipe} | {dtype} | (no run at {r['missing']}) | | | | | | |")
                continue
            agree = (f"{agreement['mask_entries_equal']:.4f} | {agreement['fp32_pruned_also_pruned_in_bf16']:.4f}"
                     if agreement and dtype == "bfloat16" else " | ")
            print(f"| {recipe} | {dtype} | {', '.join(r['projection_dtypes'])} | {r['achieved_sparsity']:.6f} | "
                  f"{r['zero_fraction_in_export']:.6f} | {r['ppl_dense']:.2f} | {r['ppl_pruned']:.2f} | {agree} |")


if __name__ == "__main__":
    main()
