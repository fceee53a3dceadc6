"""CPU inference of dense, masked and compacted models: prefill and decode throughput, peak memory, sizes.

    python bench/inference.py --repeats 3 --out bench/out/inference.json

Models (all from the bundled SmolLM2-135M): ``dense``; ``composite`` = Mosaic composite pruning at 50% of
projection weights with ``structured_fraction`` 0.62 (31% of projection weights removed as whole MLP channels
and query heads, uniform per layer) kept *masked* (same shapes as dense) and *compacted* (physically smaller,
plain HF directory); ``structured-30`` = 30% removed structurally only, compacted; ``structprune-30`` /
``structprune-50`` = StructPrune (method ``structprune`` + allocation ``energy``, as ``recipes/structprune-30.yaml``:
per-layer sizes, loaded with ``load_pruned``), compacted. ``--kinds`` measures a subset. Each measurement runs in
its own subprocess (so peak RSS is its own) and the kinds are interleaved per repeat, so ratios come from
one run under the same machine load; the table shows medians.
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

MODELS = pathlib.Path("bench/out/models")
KINDS = ["dense", "composite-masked", "composite-compacted", "structured-30-compacted", "structprune-30-compacted",
         "structprune-50-compacted"]  # fmt: skip


def _calibration(samples: int = 16, seq_len: int = 512) -> list[torch.Tensor]:
    from mosaic_lightning.core.assets import BUNDLED_MODEL, load_tokenizer, wikipedia_split
    from mosaic_lightning.lit.data import TokenWindows

    train, _ = wikipedia_split()
    ids = load_tokenizer(BUNDLED_MODEL)("\n\n".join(train), add_special_tokens=False)["input_ids"]
    windows = TokenWindows(torch.tensor(ids), seq_len).windows
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    return list(windows[order[:samples]].split(4))


def prepare(kinds: list[str]) -> None:
    """Prune and save the model variants these kinds need, once (skipped when present)."""
    from mosaic_lightning import PruningConfig, compact_model, prune_model, save_pruned
    from mosaic_lightning.core.assets import BUNDLED_MODEL, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(BUNDLED_MODEL)
    batches = _calibration()
    variants = {
        "composite": PruningConfig(0.5, "wanda", "mosaic", structured_fraction=0.62, uniform_structure=True),
        "structured-30": PruningConfig(0.3, "wanda", "uniform", structured_fraction=1.0, uniform_structure=True),
        "structprune-30": PruningConfig(0.3, "structprune", "energy", structured_fraction=1.0),
        "structprune-50": PruningConfig(0.5, "structprune", "energy", structured_fraction=1.0),
    }
    for name, config in variants.items():
        if (MODELS / f"{name}-compacted").exists() or not any(k.startswith(f"{name}-") for k in kinds):
            continue
        model = load_causal_lm(BUNDLED_MODEL)
        outcome = prune_model(model, batches, config, progress=False)
        if name == "composite":
            save_pruned(model, tokenizer, MODELS / f"{name}-masked", outcome.report)
        compact_model(model, outcome.structure)
        save_pruned(model, tokenizer, MODELS / f"{name}-compacted", outcome.report)
        if name == "composite":
            save_pruned(model, tokenizer, MODELS / f"{name}-compressed", outcome.report, compress=True)


def _path(kind: str) -> str:
    """A kind's model directory; a kind that is itself a directory (an export of another bench) is that one."""
    from mosaic_lightning.core.assets import ensure_bundled_fp32

    if kind == "dense":
        return str(ensure_bundled_fp32())
    return kind if pathlib.Path(kind).is_dir() else str(MODELS / kind)


def _per_layer_sizes(path: str) -> bool:
    config = pathlib.Path(path, "config.json")
    return config.is_file() and "mosaic_layer_shapes" in json.loads(config.read_text())


@torch.no_grad()
def measure(kind: str, prompt_len: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from mosaic_lightning import load_pruned

    if _per_layer_sizes(_path(kind)):  # per-layer sizes: our loader
        model = load_pruned(_path(kind), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(_path(kind), dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (8, 512), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids[:1, :64], use_cache=False)  # warm-up
    clock = time.perf_counter()
    model(input_ids=ids[:1], use_cache=False)
    prefill = 512 / (time.perf_counter() - clock)
    result = {"kind": kind, "params": params, "prefill_tok_s": prefill}
    for batch in (1, 8):
        prompt = ids[:batch, :prompt_len]
        clock = time.perf_counter()
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
        result[f"decode_b{batch}_tok_s"] = batch * new_tokens / (time.perf_counter() - clock)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _peak_rss_mb() -> float:
    """This process's own peak RSS. ``ru_maxrss`` is not used: Linux carries it over fork+exec, so a child of a
    parent that pruned models would report the parent's peak."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _file_mb(kind: str) -> float:
    if kind == "dense":
        return pathlib.Path(_path(kind), "model.safetensors").stat().st_size / 2**20
    files = list(pathlib.Path(_path(kind)).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/out/inference.json")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {','.join(KINDS)}")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.prompt_len, args.new_tokens)))
        return
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or kinds[0] != "dense":
        raise SystemExit(f"--kinds {args.kinds!r}: start with dense, then any of {', '.join(KINDS[1:])}")
    prepare(kinds)
    runs = []
    for _ in range(args.repeats):
        for kind in kinds:
            cmd = [sys.executable, __file__, "--measure", kind, "--prompt-len", str(args.prompt_len),
                   "--new-tokens", str(args.new_tokens)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    metrics = ["prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "peak_rss_mb"]
    summary = {k: {m: statistics.median(r[m] for r in runs if r["kind"] == k) for m in metrics} for k in kinds}
    for kind in kinds:
        summary[kind]["params"] = next(r["params"] for r in runs if r["kind"] == kind)
        summary[kind]["file_mb"] = _file_mb(kind)
    if "composite-compacted" in kinds:
        summary["composite-compressed"] = {"file_mb": _file_mb("composite-compressed")}
    dense = summary["dense"]
    print(f"\n{args.repeats} repeat(s), medians; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'model':<24} {'params':>11} {'file MB':>8} {'prefill t/s':>12} {'decode b1':>10} {'decode b8':>10} "
          f"{'peak RSS MB':>12}")  # fmt: skip
    for kind in kinds:
        s = summary[kind]
        print(f"{kind:<24} {s['params']:>11,} {s['file_mb']:>8.0f} {s['prefill_tok_s']:>12.0f} "
              f"{s['decode_b1_tok_s']:>10.1f} {s['decode_b8_tok_s']:>10.1f} {s['peak_rss_mb']:>12.0f}")  # fmt: skip
        s["ratios_to_dense"] = {m: s[m] / dense[m] for m in metrics}
    if "composite-compressed" in summary:
        print(f"{'composite-compressed':<24} {'':>11} {summary['composite-compressed']['file_mb']:>8.0f}")
    for kind in kinds[1:]:
        r = summary[kind]["ratios_to_dense"]
        print(f"{kind:<24} x dense: prefill {r['prefill_tok_s']:.2f}, decode b1 {r['decode_b1_tok_s']:.2f}, "
              f"decode b8 {r['decode_b8_tok_s']:.2f}, peak RSS {r['peak_rss_mb']:.2f}")  # fmt: skip
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
