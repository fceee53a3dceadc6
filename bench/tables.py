"""Markdown tables for bench/RESULTS.md from the JSON the benchmarks write (``bench/out/*.json``).

python bench/tables.py            # prints every table whose JSON exists
"""

from __future__ import annotations

import json
import pathlib

OUT = pathlib.Path("bench/out")


def _load(name: str) -> dict | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def quality(name: str) -> None:
    data = _load(name)
    if data is None:
        return
    print(f"\n### {name} ({json.dumps(data['args'])})\n")
    print("| method | allocation | sparsity | pattern | structured share | achieved | perplexity | prune s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in data["results"]:
        print(
            f"| {r['method']} | {r['allocation']} | {r['sparsity']:.0%} | {r['pattern']} | "
            f"{r.get('structured_share', 0):.3f} | {r.get('achieved_sparsity', 0):.4f} | {r['ppl']:.2f} | "
            f"{r.get('prune_s', 0):.0f} |"
        )


def accuracy(name: str = "accuracy") -> None:
    """``bench/quality.py --suite accuracy --tasks ...``: lm-eval's acc / acc_norm (± stderr) per row and task."""
    data = _load(name)
    if data is None:
        return
    tasks = list(data["results"][0]["tasks"])
    print(f"\n### {name} ({json.dumps(data['args'])})\n")
    print("| model | removed | structural share | perplexity | " + " | ".join(f"{t} acc | {t} acc_norm" for t in tasks)
          + " |")  # fmt: skip
    print("| --- " * (4 + 2 * len(tasks)) + "|")
    for r in data["results"]:
        label = "dense" if r["method"] == "dense" else f"{r['method']} + {r['allocation']}"
        scores = [r["tasks"][t] for t in tasks]
        cells = [f"{v[m]:.3f} ± {v[m + '_stderr']:.3f}" for v in scores for m in ("acc", "acc_norm")]
        print(f"| {label} | {r['sparsity']:.0%} | {r.get('structured_share', 0):.3f} | {r['ppl']:.2f} | "
              + " | ".join(cells) + " |")  # fmt: skip


def speed() -> None:
    data = _load("speed")
    if data is None:
        return
    print(f"\n### speed ({data['tokens']} calibration tokens, {json.dumps(data['args'])})\n")
    print("| run | median s | x forward | peak RSS MB | RSS after load MB |")
    print("| --- | --- | --- | --- | --- |")
    for kind, s in data["summary"].items():
        print(
            f"| {kind} | {s['median_s']:.1f} | {s['ratio_to_forward']:.2f} | {s['median_peak_rss_mb']:.0f} | "
            f"{s['median_rss_after_load_mb']:.0f} |"
        )


def inference() -> None:
    data = _load("inference")
    if data is None:
        return
    print(f"\n### inference ({json.dumps(data['args'])})\n")
    print("| model | params | file MB | prefill tok/s | decode b1 tok/s | decode b8 tok/s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, s in data["summary"].items():
        if "params" not in s:
            print(f"| {kind} | | {s['file_mb']:.0f} | | | | |")
            continue
        ratio = s.get("ratios_to_dense", {})

        def cell(metric: str, fmt: str, s=s, ratio=ratio) -> str:
            return f"{s[metric]:{fmt}} ({ratio.get(metric, 1):.2f}x)"

        print(
            f"| {kind} | {s['params']:,} | {s['file_mb']:.0f} | {cell('prefill_tok_s', '.0f')} | "
            f"{cell('decode_b1_tok_s', '.1f')} | {cell('decode_b8_tok_s', '.1f')} | {cell('peak_rss_mb', '.0f')} |"
        )


def training() -> None:
    data = _load("training")
    if data is None:
        return
    print(f"\n### training ({json.dumps(data['args'])})\n")
    print("| run | perplexity | dense | achieved | zeros counted in export | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in data["results"].items():
        if isinstance(r, dict):
            print(
                f"| {name} | {r['ppl']:.2f} | {r['ppl_dense']:.2f} | {r['achieved_sparsity']:.4f} | "
                f"{r['zero_fraction_counted']:.6f} | {r['wall_s']:.0f} |"
            )
    if "lora_gap_closed" in data["results"]:
        print(f"\nLoRA recovery closes {100 * data['results']['lora_gap_closed']:.1f}% of the gap to dense.")


if __name__ == "__main__":
    quality("quality")
    quality("composite")
    accuracy()
    speed()
    inference()
    training()
