"""Where in the 30 blocks SparseLLM's end-to-end gap to SparseGPT opens: the composed model's error after each block.

    python bench/block_gap.py --sparsity 0.7 --calibration-samples 32 --heldout-windows 16 \
        --out bench/out/block-gap-70.json

For each method a fresh SmolLM2-135M is pruned whole (uniform, blocks in order, each calibrated on the previous
blocks' pruned output, as ``bench/quality.py`` prunes), from the same calibration draw. Then the held-out windows
run through the dense model and each pruned one, and after every block ``l`` the relative error of the residual
stream, ``||h_l - h_l_dense||^2 / ||h_l_dense||^2`` summed over every token before dividing, is recorded with the
held-out perplexity; a second figure averages each token's own ratio, since the summed one is dominated by the
few tokens that carry massive activations. A per-block MLP error (``bench/holdout_error.py``) measures one block
given its inputs; this measures what the composition has accumulated by that block, which the end-to-end loss sees.

A method written ``BODY+LAST`` (e.g. ``sparsellm+sparsegpt``) prunes every block but the last with ``BODY`` and
then the last block with ``LAST``, calibrated on the stream the pruned body produces (what a sequential prune of
that block would see): it tests whether a gap that opens in the last block closes when that block is pruned
otherwise. Every projection keeps the uniform sparsity either way.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from quality import calibration_and_heldout

from mosaic_lightning import PruningConfig, perplexity, prune_model
from mosaic_lightning.core.assets import BUNDLED_MODEL, load_causal_lm, load_tokenizer


@torch.no_grad()
def block_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after each decoder block (the block's own output, before the final norm)."""
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple)
                                                                                 else out))
               for layer in model.model.layers]  # fmt: skip
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def prune(model, calibration: list[torch.Tensor], sparsity: float, method: str) -> None:
    """Prune ``model`` uniformly with ``method``, or with ``BODY+LAST``: the last block by ``LAST``."""
    body, _, last = method.partition("+")
    if not last:
        prune_model(model, calibration, PruningConfig(sparsity, body, "uniform"), progress=False)
        return
    last_block = rf"model\.layers\.{len(model.model.layers) - 1}\..*"
    prune_model(model, calibration, PruningConfig(sparsity, body, "uniform", exclude=[last_block]), progress=False)
    prune_model(model, calibration, PruningConfig(sparsity, last, "uniform", targets=[last_block]), progress=False)


@torch.no_grad()
def relative_errors(
    dense_outputs: list[list[torch.Tensor]], pruned, batches: list[torch.Tensor]
) -> dict[str, list[float]]:
    """Per block, against the dense model's residual stream (``dense_outputs``: :func:`block_outputs` of each batch):
    ``summed``, squared distance over squared norm with both summed over all tokens (dominated by the few tokens
    that carry massive activations), and ``per_token``, each token's own ratio averaged over the tokens."""
    summed: list[list[float]] = []
    per_token: list[list[float]] = []
    for ids, dense in zip(batches, dense_outputs, strict=True):
        for block, (want, got) in enumerate(zip(dense, block_outputs(pruned, ids), strict=True)):
            if block == len(summed):
                summed.append([0.0, 0.0])
                per_token.append([0.0, 0.0])
            distance, norm = (got - want).pow(2).sum(-1), want.pow(2).sum(-1)
            summed[block][0] += float(distance.sum())
            summed[block][1] += float(norm.sum())
            per_token[block][0] += float((distance / norm).sum())
            per_token[block][1] += distance.numel()
    return {"summed": [e / n for e, n in summed], "per_token": [e / n for e, n in per_token]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["sparsegpt", "sparsellm"],
        help="method names, or BODY+LAST to prune the last block with LAST",
    )
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--heldout-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="the calibration draw (bench/quality.py's seeds)")
    parser.add_argument("--out", default="bench/out/block-gap.json")
    args = parser.parse_args()

    calibration, heldout = calibration_and_heldout(load_tokenizer(BUNDLED_MODEL), args.calibration_samples,
                                                   args.heldout_windows, args.seq_len, args.seed)  # fmt: skip
    dense = load_causal_lm(BUNDLED_MODEL).eval()
    results = {"dense_ppl": perplexity(dense, heldout, progress=False), "methods": {}}
    dense_outputs = [block_outputs(dense, ids) for ids in heldout]  # once, for every method
    del dense
    for method in args.methods:
        model = load_causal_lm(BUNDLED_MODEL).eval()
        prune(model, calibration, args.sparsity, method)
        results["methods"][method] = {"ppl": perplexity(model, heldout, progress=False),
                                      "block_error": relative_errors(dense_outputs, model, heldout)}  # fmt: skip
        print(json.dumps({"method": method, "ppl": results["methods"][method]["ppl"]}), flush=True)
        del model

    names = list(results["methods"])
    print(f"\n| block | {' | '.join(f'{n} summed' for n in names)} | {' | '.join(f'{n} per token' for n in names)} |")
    print(f"| ---: | {' | '.join('---:' for _ in names * 2)} |")
    columns = [results["methods"][n]["block_error"][kind] for kind in ("summed", "per_token") for n in names]
    for block, row in enumerate(zip(*columns, strict=True)):
        print(f"| {block} | {' | '.join(f'{e:.4f}' for e in row)} |")
    ppl = " / ".join(f"{results['methods'][n]['ppl']:.2f}" for n in names)
    print(f"\nheld-out perplexity {' / '.join(names)}: {ppl} (dense {results['dense_ppl']:.2f})")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
