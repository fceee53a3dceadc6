"""One block's MLP output error on the calibration tokens vs held-out tokens, per method: does a method fit the
calibration tokens at the expense of the text it never saw?

    python bench/holdout_error.py --layers 3 15 27 --sparsities 0.7 0.8 --out bench/out/holdout-error.json

The open question: SparseLLM (refits of up/gate/down on the calibration tokens) is behind SparseGPT at 70%
but ahead at 80-90%. For each layer ``L``, a fresh SmolLM2-135M has only block ``L`` pruned (``targets``: that
block's seven projections; every other block dense), calibrated as ``bench/quality.py`` calibrates (32 x 512
tokens from the first 80 articles). The MLP's relative output error ``||mlp(x) - mlp_dense(x)||^2 /
||mlp_dense(x)||^2`` is then measured on the MLP's own inputs ``x`` (from the pruned model) for the calibration
windows and for held-out windows of the last 20 articles. A method that over-fits has a low calibration error
and a higher held-out/calibration ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib

import torch
from quality import calibration_and_heldout

from mosaic_lightning import PruningConfig, prune_model
from mosaic_lightning.core.assets import BUNDLED_MODEL, load_causal_lm, load_tokenizer


@torch.no_grad()
def mlp_error(model, dense_mlp: torch.nn.Module, layer: int, batches: list[torch.Tensor]) -> float:
    """Relative squared error of block ``layer``'s MLP against ``dense_mlp`` on the MLP's inputs, summed over
    every token of ``batches`` before dividing."""
    mlp = model.model.layers[layer].mlp
    sums = [0.0, 0.0]

    def record(_module, args, output):
        reference = dense_mlp(args[0])
        sums[0] += float((output - reference).pow(2).sum())
        sums[1] += float(reference.pow(2).sum())

    handle = mlp.register_forward_hook(record)
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return sums[0] / sums[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 15, 27])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.7, 0.8])
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "sparsellm"])
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--heldout-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default="bench/out/holdout-error.json")
    args = parser.parse_args()

    calibration, heldout = calibration_and_heldout(load_tokenizer(BUNDLED_MODEL), args.calibration_samples,
                                                   args.heldout_windows, args.seq_len)  # fmt: skip

    rows = []
    for sparsity in args.sparsities:
        for layer in args.layers:
            for method in args.methods:
                model = load_causal_lm(BUNDLED_MODEL).eval()
                dense_mlp = copy.deepcopy(model.model.layers[layer].mlp)
                config = PruningConfig(sparsity, method, "uniform", targets=[rf"model\.layers\.{layer}\..*"])
                prune_model(model, calibration, config, progress=False)
                row = {"sparsity": sparsity, "layer": layer, "method": method,
                       "calibration": mlp_error(model, dense_mlp, layer, calibration),
                       "heldout": mlp_error(model, dense_mlp, layer, heldout)}  # fmt: skip
                row["ratio"] = row["heldout"] / row["calibration"]
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n{'sparsity':>8} {'layer':>5} {'method':<10} {'calibration':>12} {'held-out':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['sparsity']:>8.0%} {r['layer']:>5} {r['method']:<10} {r['calibration']:>12.4f} "
              f"{r['heldout']:>10.4f} {r['ratio']:>6.2f}")  # fmt: skip
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
