"""Ours beside llm-compressor on the same inputs: time, peak RSS, masks and perplexity.

    python -m venv --system-site-packages /work/llmc-venv
    /work/llmc-venv/bin/pip install llmcompressor==0.14.0.1
    python bench/peer.py --peer-python /work/llmc-venv/bin/python --calibration-samples 32 --seq-len 512 \\
        --repeats 2 --out bench/out/peer.json

llm-compressor pins its own transformers and compressed-tensors, so it runs from its own environment
(``--peer-python``; ``--system-site-packages`` lets it reuse this machine's torch wheel). The main process writes the
calibration tokens once (``calibration.safetensors``: the same 512-token windows ``bench/speed.py`` draws, seed 0)
and the bundled model's float32 directory is the one model both load, so every measurement prunes the same weights
on the same tokens. Kinds, each measured in a fresh subprocess, interleaved, ``--repeats`` times:

- ``forward1`` / ``llmc:forward1``: one plain forward pass, batch 1, full model, over the calibration tokens, in our
  environment and in the peer's (their transformers versions differ, so each side's ratio is to its own forward);
- ``wanda``, ``sparsegpt``: ours, ``prune_model`` at 50% uniform, default (reference) sequential order, and
  ``wanda-ts``, ``sparsegpt-ts``: the same in true-sequential order (``bench/speed.py``'s kinds);
- ``llmc:wanda``, ``llmc:sparsegpt``: llm-compressor's ``oneshot`` with ``WandaPruningModifier`` /
  ``SparseGPTModifier`` (sparsity 0.5, targets ``Linear``, ``lm_head`` ignored, its defaults otherwise: the
  sequential pipeline, batch 1, block size 128, dampening 0.01). Its time includes what ``oneshot`` does besides
  pruning (building the dataloader, tracing the decoder layers into subgraphs): it is the call a user makes.

Times exclude loading the model and importing the pruner; peak RSS is the process's high-water mark (imports
included: ours imports Lightning, the peer llm-compressor). After the timings the first repeat's pruned projections
are loaded into the dense model one kind at a time and scored: achieved sparsity, perplexity on the first
``--eval-windows`` held-out windows, and the fraction of mask entries each pair of the same method agrees on.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

PEER = "llmc:"


def measure(kind: str, model_dir: str, calibration: pathlib.Path, save: pathlib.Path | None) -> dict:
    """One measurement in this process: seconds and peak RSS; then (``save``) the pruned projections, written.
    The pruner's imports happen before the clock starts, as the model's loading does."""
    import transformers
    from safetensors.torch import load_file

    ids = load_file(str(calibration))["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    run = _runner(kind)
    clock = time.perf_counter()
    run(model, ids)
    result = {"kind": kind, "seconds": time.perf_counter() - clock, "transformers": transformers.__version__,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip
    if save is not None and not kind.endswith("forward1"):
        _save_projections(model, save)
    return result


def _runner(kind: str) -> Callable[[torch.nn.Module, torch.Tensor], None]:
    method = kind.removeprefix(PEER)
    if method == "forward1":
        return _forward_batch_1
    if kind.startswith(PEER):
        return _llm_compressor_pruner(method)
    from speed import _config

    from mosaic_lightning import prune_model

    config = _config(kind)
    return lambda model, ids: prune_model(model, list(ids.split(4)), config, progress=False)  # 4 a batch, as the CLI


@torch.no_grad()
def _forward_batch_1(model: torch.nn.Module, ids: torch.Tensor) -> None:
    for row in ids:
        model(input_ids=row[None], use_cache=False)


def _llm_compressor_pruner(method: str) -> Callable[[torch.nn.Module, torch.Tensor], None]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    modifiers = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}
    if method not in modifiers:
        raise SystemExit(f"kind {PEER}{method!r}: allowed {', '.join(PEER + name for name in modifiers)}")

    def prune(model: torch.nn.Module, ids: torch.Tensor) -> None:
        modifier = modifiers[method](sparsity=0.5, targets=["Linear"], ignore=["re:.*lm_head"])
        dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        oneshot(model=model, dataset=dataset, recipe=[modifier], num_calibration_samples=len(ids),
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False)  # fmt: skip

    return prune


def _save_projections(model: torch.nn.Module, path: pathlib.Path) -> None:
    """The weights of every ``nn.Linear`` in the decoder blocks (not ``lm_head``), as one safetensors file."""
    from safetensors.torch import save_file

    weights = {f"{name}.weight": module.weight.detach().contiguous() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name}  # fmt: skip
    save_file(weights, str(path))


def score(model_dir: str, saved: dict[str, pathlib.Path], heldout: list[torch.Tensor]) -> dict[str, dict]:
    """Achieved sparsity and held-out perplexity of each kind's pruned projections in the dense model, and the
    mask agreement of ours with the peer's for the same method."""
    from safetensors.torch import load_file

    from mosaic_lightning import perplexity
    from mosaic_lightning.core.assets import load_causal_lm

    scores: dict[str, dict] = {"dense": {"ppl": perplexity(load_causal_lm(model_dir), heldout, progress=False)}}
    for kind, path in saved.items():
        weights = load_file(str(path))
        model = load_causal_lm(model_dir)
        unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{kind}: saved tensors the model does not have: {unexpected[:3]}")
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        total = sum(w.numel() for w in weights.values())
        scores[kind] = {"sparsity": zeros / total, "ppl": perplexity(model, heldout, progress=False)}
    for kind in saved:
        peer = PEER + kind.removesuffix("-ts")
        if not kind.startswith(PEER) and peer in saved:
            scores[kind]["mask_agreement_with_peer"] = _mask_agreement(saved[kind], saved[peer])
    return scores


def _mask_agreement(a: pathlib.Path, b: pathlib.Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    same = sum(int(((first[name] == 0) == (second[name] == 0)).sum()) for name in first)
    return same / sum(w.numel() for w in first.values())


def _write_calibration(path: pathlib.Path, samples: int, seq_len: int) -> None:
    from safetensors.torch import save_file
    from speed import _calibration

    save_file({"input_ids": torch.cat(_calibration(samples, seq_len)).contiguous()}, str(path))


def _heldout(samples: int, windows: int, seq_len: int) -> list[torch.Tensor]:
    from quality import calibration_and_heldout

    from mosaic_lightning.core.assets import BUNDLED_MODEL, load_tokenizer

    return calibration_and_heldout(load_tokenizer(BUNDLED_MODEL), samples, windows, seq_len)[1]


def _run(kind: str, peer_python: str, model_dir: str, calibration: pathlib.Path, save: pathlib.Path | None) -> dict:
    python = peer_python if kind.startswith(PEER) else sys.executable
    cmd = [python, __file__, "--measure", kind, "--model-dir", model_dir, "--calibration", str(calibration)]
    if save is not None:
        cmd += ["--save", str(save)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summarise(kinds: list[str], runs: list[dict], scores: dict[str, dict]) -> dict[str, dict]:
    summary = {}
    for kind in kinds:
        mine = [r for r in runs if r["kind"] == kind]
        summary[kind] = {"median_s": statistics.median(r["seconds"] for r in mine),
                         "seconds": [r["seconds"] for r in mine],
                         "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
                         "peak_rss_mb": [r["peak_rss_mb"] for r in mine],
                         "transformers": mine[0]["transformers"], **scores.get(kind, {})}  # fmt: skip
    for kind, row in summary.items():
        forward = (PEER if kind.startswith(PEER) else "") + "forward1"
        row["ratio_to_own_forward1"] = row["median_s"] / summary[forward]["median_s"]
    return summary


def _print_table(summary: dict[str, dict], dense_ppl: float) -> None:
    print(f"\ndense perplexity {dense_ppl:.3f}")
    print(f"{'kind':<16} {'median s':>9} {'x own fwd1':>11} {'peak RSS MB':>12} {'sparsity':>9} {'ppl':>8} "
          f"{'masks = peer':>13}")  # fmt: skip
    for kind, row in summary.items():
        sparsity, ppl = row.get("sparsity", float("nan")), row.get("ppl", float("nan"))
        agreement = row.get("mask_agreement_with_peer", float("nan"))
        print(f"{kind:<16} {row['median_s']:>9.1f} {row['ratio_to_own_forward1']:>11.2f} "
              f"{row['median_peak_rss_mb']:>12.0f} {sparsity:>9.4f} {ppl:>8.3f} {agreement:>13.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="the interpreter of the environment llm-compressor is installed in")
    parser.add_argument("--kinds", default="forward1,llmc:forward1,wanda,llmc:wanda,sparsegpt,llmc:sparsegpt")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/out/peer.json")
    for hidden in ("--measure", "--model-dir", "--calibration", "--save"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        save = pathlib.Path(args.save) if args.save else None
        print(json.dumps(measure(args.measure, args.model_dir, pathlib.Path(args.calibration), save)))
        return
    kinds = args.kinds.split(",")
    if any(kind.startswith(PEER) for kind in kinds) and not args.peer_python:
        raise SystemExit(f"--peer-python is required for the {PEER} kinds")
    missing = sorted({(PEER if kind.startswith(PEER) else "") + "forward1" for kind in kinds} - set(kinds))
    if missing:
        raise SystemExit(f"--kinds: add {', '.join(missing)}, the baseline of its environment's kinds")

    from mosaic_lightning.core.assets import ensure_bundled_fp32

    model_dir = str(ensure_bundled_fp32())
    with tempfile.TemporaryDirectory() as folder:
        calibration = pathlib.Path(folder) / "calibration.safetensors"
        _write_calibration(calibration, args.calibration_samples, args.seq_len)
        runs, saved = [], {}
        for repeat in range(args.repeats):
            for kind in kinds:
                save = None
                if repeat == 0 and not kind.endswith("forward1"):
                    save = saved[kind] = pathlib.Path(folder) / f"{kind.replace(':', '_')}.safetensors"
                runs.append(_run(kind, args.peer_python, model_dir, calibration, save))
                print(json.dumps(runs[-1]), flush=True)
        heldout = _heldout(args.calibration_samples, args.eval_windows, args.seq_len)
        scores = score(model_dir, saved, heldout)
    summary = _summarise(kinds, runs, scores)
    tokens = args.calibration_samples * args.seq_len
    print(f"\ncalibration {args.calibration_samples} x {args.seq_len} = {tokens} tokens, {args.repeats} repeat(s), "
          f"{torch.get_num_threads()} threads; held-out {args.eval_windows} x {args.seq_len}")  # fmt: skip
    _print_table(summary, scores["dense"]["ppl"])
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "tokens": tokens, "runs": runs, "summary": summary,
                               "dense_ppl": scores["dense"]["ppl"]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
