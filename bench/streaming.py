"""Streamed pruning (``--stream true``): peak memory, time and bytes moved, against the in-memory path.

    python bench/streaming.py real --eval-windows 64 --out bench/out/streaming-real.json
    python bench/streaming.py big --work /big/disk/folder --out bench/out/streaming-big.json

``real``: the bundled SmolLM2-135M, ``recipes/wanda-50.yaml`` through the CLI, in memory and then ``--stream
true``, in one run: wall time and peak RSS (``/usr/bin/time``) of each, the ratio, and that both exports hold the
same tensors bit for bit.

``big``: a random-initialised Llama-architecture model larger than this machine's memory (``--layers`` 32,
hidden 4096, MLP 11008 in float32: about 6.9B parameters, 27.5 GB), written one shard per block so that it never
exists in memory; then Wanda 50% through the CLI with ``--stream true`` under ``/usr/bin/time``, and a few exported
tensors read back to check their exact sparsity. Random weights make the quality meaningless (``--evaluate
false``); the point is that it runs, how long it takes and its peak memory. Needs about twice the model's size in
free disk under ``--work`` (source and export); both are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _timed_cli(args: list[str], log: pathlib.Path) -> dict:
    """``train.py fit`` under ``/usr/bin/time``: wall seconds and peak RSS (MB)."""
    timing = log.with_suffix(".time")
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", *args]
    with log.open("w") as out:
        subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(timing), *cmd], check=True, stdout=out,
                       stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    wall, rss_kb = timing.read_text().split()[-2:]
    command = "python train.py fit " + " ".join(args)
    return {"command": command, "wall_s": float(wall), "peak_rss_mb": int(rss_kb) / 1024}


def _same_tensors(a: pathlib.Path, b: pathlib.Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).state_dict()
    want = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def real(args) -> dict:
    work = pathlib.Path(args.work) / "streaming-real"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = ["--config", "recipes/wanda-50.yaml", "--trainer.logger", "false", "--data.num_calibration_samples",
            str(args.samples), "--data.max_eval_windows", str(args.eval_windows)]  # fmt: skip
    rows = {}
    for name, extra in (("in_memory", []), ("streamed", ["--stream", "true"])):
        rows[name] = _timed_cli([*base, *extra, "--export_dir", str(work / name)], work / f"{name}.log")
        report = json.loads((work / name / "pruning_report.json").read_text())
        rows[name].update(ppl_dense=report["ppl_dense"], ppl_pruned=report["ppl_pruned"],
                          phase_peak_rss_mb=report["peak_memory_mb"], io_bytes=report["io_bytes"])  # fmt: skip
    result = {
        "model": "bundled:smollm2-135m (float32)",
        "runs": rows,
        "rss_ratio_streamed_over_in_memory": rows["streamed"]["peak_rss_mb"] / rows["in_memory"]["peak_rss_mb"],
        "time_ratio_streamed_over_in_memory": rows["streamed"]["wall_s"] / rows["in_memory"]["wall_s"],
        "identical_exports": _same_tensors(work / "streamed", work / "in_memory"),
    }
    print(f"{'run':<10} {'wall s':>8} {'peak RSS MB':>12} {'ppl pruned':>11}")
    for name, row in rows.items():
        print(f"{name:<10} {row['wall_s']:>8.1f} {row['peak_rss_mb']:>12.0f} {row['ppl_pruned']:>11.3f}")
    print(
        f"streamed / in-memory: RSS {result['rss_ratio_streamed_over_in_memory']:.2f}x, time "
        f"{result['time_ratio_streamed_over_in_memory']:.2f}x; identical exports: {result['identical_exports']}"
    )
    if not args.keep:
        shutil.rmtree(work)
    return result


def write_random_llama(folder: pathlib.Path, layers: int, hidden: int, mlp: int, heads: int, kv_heads: int) -> int:
    """A random Llama checkpoint written one block per shard (never whole in memory); returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from mosaic_lightning.core.assets import BUNDLED_MODEL, load_tokenizer

    tokenizer = load_tokenizer(BUNDLED_MODEL)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tokenizer),
                         tie_word_embeddings=False, dtype="float32")  # fmt: skip
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    head_dim = hidden // heads
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
              "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (mlp, hidden), "mlp.up_proj.weight": (mlp, hidden),
              "mlp.down_proj.weight": (hidden, mlp)}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    shards = layers + 1
    weight_map, total = {}, 0

    def write(index: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    vocab = len(tokenizer)
    write(0, {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=generator) * 0.02,
              "lm_head.weight": torch.randn(vocab, hidden, generator=generator) * 0.02,
              "model.norm.weight": torch.ones(hidden)})  # fmt: skip
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        tensors = {prefix + k: torch.randn(*s, generator=generator) * s[1] ** -0.5 for k, s in shapes.items()}
        tensors[prefix + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden)
        write(layer + 1, tensors)
        del tensors
        print(f"wrote block {layer + 1}/{layers}", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _check_exported_sparsity(export: pathlib.Path, layers: list[int]) -> dict:
    """Read a few exported projections straight from their shards: their zero fraction (Wanda 50%: exactly half
    of every row, so exactly 0.5)."""
    from safetensors import safe_open

    weight_map = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    found = {}
    for layer in layers:
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{proj}.weight"
            with safe_open(export / weight_map[name], framework="pt") as handle:
                tensor = handle.get_tensor(name)
            found[name] = float((tensor == 0).float().mean())
    return found


def big(args) -> dict:
    work = pathlib.Path(args.work) / "streaming-big"
    shutil.rmtree(work, ignore_errors=True)
    source, export = work / "source", work / "export"
    clock = time.perf_counter()
    size = write_random_llama(source, args.layers, args.hidden, args.mlp, args.heads, args.kv_heads)
    written_s = time.perf_counter() - clock
    cli = ["--config", "recipes/wanda-50.yaml", "--model.pretrained", str(source), "--stream", "true",
           "--export_dir", str(export), "--evaluate", "false", "--trainer.logger", "false",
           "--data.seq_len", str(args.seq_len), "--data.num_calibration_samples", str(args.samples)]  # fmt: skip
    run = _timed_cli(cli, work / "prune.log")
    report = json.loads((export / "pruning_report.json").read_text())
    memory = _machine_memory_mb()
    result = {
        "model_bytes": size,
        "model_gb": size / 1e9,
        "machine_memory_mb": memory,
        "write_source_s": written_s,
        **run,
        "peak_rss_over_model_size": run["peak_rss_mb"] * 2**20 / size,
        "phase_peak_rss_mb": report["peak_memory_mb"],
        "io_bytes": report["io_bytes"],
        "achieved_sparsity": report["achieved_sparsity"],
        "exported_zero_fraction": _check_exported_sparsity(export, [0, args.layers // 2, args.layers - 1]),
    }
    print(
        f"model {size / 1e9:.1f} GB on a {memory / 1024:.1f} GiB machine: pruned in {run['wall_s']:.0f} s, "
        f"peak RSS {run['peak_rss_mb']:.0f} MB ({result['peak_rss_over_model_size']:.3f}x the model)"
    )
    for name, fraction in result["exported_zero_fraction"].items():
        print(f"  {name}: zero fraction {fraction:.6f}")
    if not args.keep:
        shutil.rmtree(work)
    return result


def _machine_memory_mb() -> float:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["real", "big"])
    parser.add_argument("--work", default="/tmp/mosaic-bench")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (real: 128, big: 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="big: calibration sequence length")
    parser.add_argument("--eval-windows", type=int, default=64, help="real: held-out windows scored")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--keep", action="store_true", help="keep the models written")
    args = parser.parse_args()
    args.samples = args.samples or (128 if args.which == "real" else 4)
    result = real(args) if args.which == "real" else big(args)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
