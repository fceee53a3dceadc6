"""Per-rank memory while pruning under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) versus one plain process.

    python bench/zero_memory.py --out bench/out/zero_memory.json

A randomly initialised Llama (default: hidden 1024, intermediate 2816, 8 layers, vocab 32000, ~168M parameters,
fp32) is pruned one-shot with ``MosaicPruning(sparsity=0.5, method="wanda", allocation="uniform")`` from a few
random calibration batches at fit start, then trained ``--steps`` Adam steps. Configurations, each in its own
process tree so that every peak RSS is the process's own:

  * ``single``: one process, plain Lightning (``accelerator="cpu", devices=1``); DeepSpeed is never imported.
  * ``zero3``: 2 ranks, DeepSpeed ZeRO-3 over gloo (``stage3_param_persistence_threshold=0``: every parameter
    partitioned). The model is built in ``configure_model``, i.e. inside ``deepspeed.zero.Init``, so no rank
    ever materialises the whole model. Lightning re-launches this script for rank 1.

ZeRO-3 on CPU needs the TEST-ONLY ``CpuDeepSpeedStrategy`` from ``tests/distributed/cpu_deepspeed.py`` (imported
from there): Lightning's ``DeepSpeedStrategy`` refuses to run without CUDA. It lifts only that check and the
device index; partitioning, fp32 masters and optimizer state are DeepSpeed's own code. Its ``zero_config(3)``
(also used by the tests) is the DeepSpeed config, with the reduce bucket and reuse distance set by the options.

Per rank: parameter bytes held locally (ZeRO-3: ``p.ds_tensor.numel() * element_size``, else ``p.numel() *
element_size``) right after pruning and after the steps, and the bytes of whole (gathered) ZeRO-3 parameters still
resident there (should be 0); optimizer-side bytes (fp32 master partitions, Adam moments, gradient partitions); RSS
after imports (the Python/torch/Lightning/DeepSpeed baseline), RSS and peak RSS (``ru_maxrss``) at each phase (model
built, strategy set up, pruned, each step after backward and after the optimizer step), RSS at the end before and
after ``malloc_trim`` (how much is freed memory glibc kept), and wall times. Threads: the single process gets
``--threads`` (2), each ZeRO-3 rank 1, so both use the same cores. DeepSpeed settings beyond ``zero_config(3)``:
``reduce_bucket_size`` = hidden^2 (Hugging Face's "auto"; DeepSpeed's default bucket holds up to 5e8 elements,
more than this whole model's gradients), the rest DeepSpeed's defaults.

The parameter bytes halve exactly; peak RSS does not, and with glibc's default allocator it can even exceed one
process at this size: every rank pays the same interpreter/torch/Lightning/DeepSpeed baseline and its own
activations; ZeRO-3 keeps an fp32 master partition next to the (here also fp32) weight partition where torch's Adam
updates the weights in place, preallocates a gradient partition, and holds gathered module weights, whole gradients and
its own temporaries transiently in forward, backward and step; and glibc keeps the blocks freed while partitioning,
flattening and gathering resident (see the phase table). ``--malloc-mmap-threshold 131072`` (both configurations)
makes RSS follow live memory more closely.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIB = 2**20


# -- measurements (inside a worker) --------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _param_bytes(model) -> dict:
    """Bytes of parameters this rank holds: its ZeRO-3 partitions (``ds_tensor``) or whole tensors."""
    local = gathered = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel() * p.ds_tensor.element_size()
            gathered += p.data.numel() * p.element_size()  # non-empty only while ZeRO-3 has it gathered
            full += p.ds_numel * p.element_size()
        else:
            local += p.numel() * p.element_size()
            full += p.numel() * p.element_size()
    return {"local_mib": local / MIB, "gathered_mib": gathered / MIB, "full_model_mib": full / MIB}


def _tensor_mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and t.dim() > 0) / MIB


def _optimizer_bytes(trainer, model) -> dict:
    """fp32 master partitions, Adam moments and gradient buffers this rank holds (best effort, MiB)."""
    engine = None
    if "deepspeed" in sys.modules:
        from mosaic_lightning.core.zero import deepspeed_engine

        engine = deepspeed_engine(trainer)
    if engine is None:
        optimizer = trainer.optimizers[0]
        moments = [t for state in optimizer.state.values() for t in state.values() if hasattr(t, "numel")]
        return {"master_mib": 0.0, "moments_mib": _tensor_mib(moments),
                "grads_mib": _tensor_mib(p.grad for p in model.parameters()), "grad_bucket_mib": 0.0}  # fmt: skip
    zero = engine.optimizer
    moments = [t for state in zero.optimizer.state.values() for t in state.values() if hasattr(t, "numel")]
    buckets = [getattr(b, "buffer", None) for b in getattr(zero, "ipg_buckets", {}).values()]
    return {
        "master_mib": _tensor_mib(getattr(zero, "fp32_partitioned_groups_flat", [])),
        "moments_mib": _tensor_mib(moments),
        "grads_mib": _tensor_mib([getattr(zero, "grad_partitions_flat_buffer", None)]),
        "grad_bucket_mib": _tensor_mib(buckets),  # allocated size; only the pages written become resident
    }


def _masked_zero_fraction(callback, model) -> float:
    """Fraction of zeros in this rank's share of the pruned projections (the masks hold after the steps)."""
    from mosaic_lightning.core.masks import named_parameters

    params = named_parameters(model)
    zeros = total = 0
    for name in callback.masks.masks:
        p = params[name]
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        zeros += int((local == 0).sum())
        total += local.numel()
    return zeros / max(total, 1)


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration: fit with pruning, write this rank's measurements as JSON."""
    clock0 = time.perf_counter()
    zero3 = args.role == "zero3"
    if zero3:
        sys.path.insert(0, str(ROOT / "tests" / "distributed"))
        from cpu_deepspeed import CpuDeepSpeedStrategy, zero_config  # sets DS_* env before importing DeepSpeed

        importlib.import_module("deepspeed")  # after cpu_deepspeed set DS_*; now, so the RSS baseline includes it
    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    from mosaic_lightning import MosaicPruning

    torch.set_num_threads(args.threads)
    rss_baseline = _rss_mib()
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq_len, 128))  # fmt: skip

    class BenchLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = None

        def configure_model(self) -> None:  # under ZeRO-3 this runs inside deepspeed.zero.Init
            if self.model is None:
                torch.manual_seed(0)
                self.model = LlamaForCausalLM(config)
                _phase("model_built")

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            _phase(f"step{batch_idx + 1}")

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch, use_cache=False).loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    record: dict = {"role": args.role, "threads": torch.get_num_threads(), "rss_baseline_mib": rss_baseline,
                    "phases": {}}  # fmt: skip
    marks: dict[str, float] = {}

    def _phase(name: str) -> None:  # RSS now and peak so far, in MiB
        record["phases"][name] = {"rss_mib": _rss_mib(), "peak_rss_mib": _peak_rss_mib()}

    class Clock(L.Callback):  # first in the list: before MosaicPruning prunes
        def on_fit_start(self, trainer, pl_module) -> None:
            marks["fit_start"] = time.perf_counter()
            _phase("setup_done")

    class Probe(L.Callback):  # after MosaicPruning in the list: sees the pruned model
        def on_fit_start(self, trainer, pl_module) -> None:
            marks["pruned"] = time.perf_counter()
            _phase("pruned")
            record["after_prune"] = {**_param_bytes(pl_module.model), "rss_mib": _rss_mib(),
                                     "peak_rss_mib": _peak_rss_mib()}  # fmt: skip
            record["achieved_sparsity"] = callback.report.achieved_sparsity

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            _phase(f"step{trainer.global_step + 1}_before_optimizer")  # after forward + backward

        def on_train_end(self, trainer, pl_module) -> None:
            marks["trained"] = time.perf_counter()
            _phase("trained")
            record["after_steps"] = {**_param_bytes(pl_module.model), "rss_mib": _rss_mib(),
                                     "peak_rss_mib": _peak_rss_mib(),
                                     **_optimizer_bytes(trainer, pl_module.model),
                                     "masked_zero_fraction": _masked_zero_fraction(callback, pl_module.model),
                                     }  # fmt: skip
            record["global_step"] = trainer.global_step

    g = torch.Generator().manual_seed(11)
    calibration = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
                   for _ in range(args.calibration_batches)]  # fmt: skip
    data = torch.randint(0, args.vocab, (args.batch_size * args.steps * 2, args.seq_len), generator=g)
    callback = MosaicPruning(sparsity=0.5, method="wanda", allocation="uniform", calibration_dataloader=calibration,
                             num_calibration_samples=args.batch_size * args.calibration_batches,
                             verbose=False)  # fmt: skip
    if zero3:
        ds_config = zero_config(3)  # partitions every parameter (persistence threshold 0, no prefetch)
        ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
        ds_config["zero_optimization"]["reduce_bucket_size"] = args.reduce_bucket or args.hidden * args.hidden
        if args.max_reuse_distance is not None:
            ds_config["zero_optimization"]["stage3_max_reuse_distance"] = args.max_reuse_distance
        record["deepspeed_config"] = ds_config
        strategy, devices = CpuDeepSpeedStrategy(config=ds_config), 2
    else:
        strategy, devices = "auto", 1
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.steps,
                        callbacks=[Clock(), callback, Probe()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = BenchLM()
    fit_clock = time.perf_counter()
    trainer.fit(module, DataLoader(data, batch_size=args.batch_size))
    fit_end = time.perf_counter()
    record.update(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        deepspeed_imported="deepspeed" in sys.modules,
        peak_rss_mib=_peak_rss_mib(),
        setup_s=marks["fit_start"] - fit_clock,  # configure_model (+ ZeRO-3 partitioning), deepspeed.initialize
        prune_s=marks["pruned"] - marks["fit_start"],
        steps_s=marks["trained"] - marks["pruned"],
        fit_s=fit_end - fit_clock,
        process_s=fit_end - clock0,
    )
    # Diagnostic, after the peak is taken: how much of the final RSS is freed memory the allocator kept.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    record["rss_end_mib"], record["rss_end_trimmed_mib"] = record["after_steps"]["rss_mib"], _rss_mib()
    out = pathlib.Path(args.result_dir) / f"{args.role}-rank{trainer.global_rank}.json"
    out.write_text(json.dumps(record, indent=2))
    if zero3:
        trainer.strategy.barrier()


# -- orchestration ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model_args(args: argparse.Namespace) -> list[str]:
    names = ("hidden", "intermediate", "layers", "heads", "vocab", "seq_len", "batch_size", "calibration_batches",
             "steps", "reduce_bucket", "max_reuse_distance")  # fmt: skip
    flags = []
    for name in names:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def run_config(role: str, args: argparse.Namespace, result_dir: pathlib.Path) -> tuple[list[dict], float]:
    threads = args.threads if role == "single" else 1  # same total cores: 1 process x N threads vs N ranks x 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--role", role, "--result-dir",
               str(result_dir), "--threads", str(threads), *_model_args(args)]  # fmt: skip
    clock = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - clock
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-6000:])
        raise SystemExit(f"{role}: exit code {result.returncode}")
    ranks = sorted((json.loads(p.read_text()) for p in result_dir.glob(f"{role}-rank*.json")), key=lambda r: r["rank"])
    expected = 1 if role == "single" else 2
    if len(ranks) != expected:
        raise SystemExit(f"{role}: {len(ranks)} rank results, expected {expected}")
    return ranks, wall


# -- report ----------------------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(results: dict[str, dict], steps: int) -> dict:
    """Print the per-rank table, the RSS by phase and the ratios against the single process; return the ratios."""
    base = results["single"]["ranks"][0] if "single" in results else None
    nan = float("nan")
    full = next(iter(results.values()))["ranks"][0]["after_prune"]["full_model_mib"]
    print(f"\nLlama with {full:.0f} MiB of fp32 parameters. params: bytes held locally after pruning / after {steps} "
          "steps (MiB); optim: fp32 master partitions + Adam moments + gradient partitions (MiB); RSS in MiB: after "
          "imports (base), at the end, at the end after malloc_trim (trim), peak (ru_maxrss); times in s")  # fmt: skip
    print(f"{'config':<7} {'rank':>4} {'pruned':>7} {'stepped':>7} {'x single':>8} {'optim':>6} {'base':>5} "
          f"{'end':>5} {'trim':>5} {'peak':>5} {'x single':>8} {'prune':>6} {'steps':>6} {'fit':>6}")  # fmt: skip
    for role, result in results.items():
        for r in result["ranks"]:
            pruned, after = r["after_prune"], r["after_steps"]
            optim = after["master_mib"] + after["moments_mib"] + after["grads_mib"]
            r["ratios"] = {} if base is None else {
                "params_after_prune": _ratio(pruned["local_mib"], base["after_prune"]["local_mib"]),
                "params_after_steps": _ratio(after["local_mib"], base["after_steps"]["local_mib"]),
                "peak_rss": _ratio(r["peak_rss_mib"], base["peak_rss_mib"]),
                "peak_rss_above_baseline": _ratio(r["peak_rss_mib"] - r["rss_baseline_mib"],
                                                  base["peak_rss_mib"] - base["rss_baseline_mib"]),
                "end_rss_trimmed": _ratio(r["rss_end_trimmed_mib"], base["rss_end_trimmed_mib"]),
            }  # fmt: skip
            ratios = r["ratios"]
            print(f"{role:<7} {r['rank']:>4} {pruned['local_mib']:>7.1f} {after['local_mib']:>7.1f} "
                  f"{ratios.get('params_after_steps', nan):>8.3f} {optim:>6.0f} {r['rss_baseline_mib']:>5.0f} "
                  f"{r['rss_end_mib']:>5.0f} {r['rss_end_trimmed_mib']:>5.0f} {r['peak_rss_mib']:>5.0f} "
                  f"{ratios.get('peak_rss', nan):>8.3f} {r['prune_s']:>6.1f} {r['steps_s']:>6.1f} "
                  f"{r['fit_s']:>6.1f}")  # fmt: skip

    print("\nRSS now/peak so far (MiB) by phase; 'stepN bwd': after forward and backward, before the optimizer step")
    phases = list(next(iter(results.values()))["ranks"][0]["phases"])
    short = [name.replace("_before_optimizer", " bwd") for name in phases]  # after forward + backward
    print(f"{'config':<7} {'rank':>4} " + " ".join(f"{name:>11}" for name in short))
    for role, result in results.items():
        for r in result["ranks"]:
            cells = [r["phases"].get(name) for name in phases]
            print(
                f"{role:<7} {r['rank']:>4} "
                + " ".join(
                    f"{c['rss_mib']:>5.0f}/{c['peak_rss_mib']:<5.0f}" if c else f"{'-':>11}" for c in cells
                ).rstrip()
            )

    summary: dict = {}
    for role, result in results.items():
        if base is None or role == "single":
            continue
        ranks = result["ranks"]
        s = summary[role] = {
            "param_ratio_after_prune": [r["ratios"]["params_after_prune"] for r in ranks],
            "param_ratio_after_steps": [r["ratios"]["params_after_steps"] for r in ranks],
            "peak_rss_ratio_worst_rank": max(r["ratios"]["peak_rss"] for r in ranks),
            "peak_rss_above_baseline_ratio_worst_rank": max(r["ratios"]["peak_rss_above_baseline"] for r in ranks),
            "end_rss_trimmed_ratio_worst_rank": max(r["ratios"]["end_rss_trimmed"] for r in ranks),
            "gathered_mib_at_probes": max(
                max(r["after_prune"]["gathered_mib"], r["after_steps"]["gathered_mib"]) for r in ranks
            ),  # fmt: skip
            "masked_zero_fraction": [r["after_steps"]["masked_zero_fraction"] for r in ranks],
        }
        print(f"\n{role} / single, per rank: parameter bytes after pruning "
              f"{', '.join(f'{x:.3f}' for x in s['param_ratio_after_prune'])}, after {steps} steps "
              f"{', '.join(f'{x:.3f}' for x in s['param_ratio_after_steps'])} (full parameters left gathered: "
              f"{s['gathered_mib_at_probes']:.1f} MiB); zeros in the pruned projections' local shares after the steps: "
              f"{', '.join(f'{x:.3f}' for x in s['masked_zero_fraction'])}")  # fmt: skip
        print(f"peak RSS (worst rank) {s['peak_rss_ratio_worst_rank']:.3f}; peak RSS above the post-import baseline "
              f"{s['peak_rss_above_baseline_ratio_worst_rank']:.3f}; RSS at the end after malloc_trim "
              f"{s['end_rss_trimmed_ratio_worst_rank']:.3f}")  # fmt: skip
    if summary:
        print("Peak RSS does not halve with the parameters: every rank pays the same Python/torch/Lightning/DeepSpeed "
              "baseline and its own activations; ZeRO-3 keeps an fp32 master partition next to the (here also fp32) "
              "weight partition and a preallocated gradient partition, holds gathered weights, whole gradients and "
              "temporaries transiently in forward/backward/step, and glibc keeps freed blocks (partitioning, "
              "flattening, gathers) resident unless --malloc-mmap-threshold is set; see the phase table.")  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="per rank (micro-batch) and for the single run")
    parser.add_argument("--calibration-batches", type=int, default=4, help="in all; ZeRO-3 ranks take half each")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the single process (ranks: 1)")
    parser.add_argument(
        "--reduce-bucket",
        type=int,
        default=None,
        help="ZeRO reduce_bucket_size in elements (default hidden^2, as HF's 'auto')",
    )
    parser.add_argument(
        "--max-reuse-distance", type=int, default=None, help="stage3_max_reuse_distance (default: DeepSpeed's 1e9)"
    )
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None,
                        help="set MALLOC_MMAP_THRESHOLD_ (bytes) in the workers: glibc then returns freed large "
                             "blocks to the OS at once, so RSS tracks live memory (default: glibc's own)")  # fmt: skip
    parser.add_argument("--configs", default="single,zero3")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", default="bench/out/zero_memory.json")
    parser.add_argument("--role", choices=["single", "zero3"], help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        worker(args)
        return

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="zero_memory_") as tmp:
        for role in args.configs.split(","):
            ranks, wall = run_config(role, args, pathlib.Path(tmp))
            results[role] = {"ranks": ranks, "wall_s": wall}
            print(f"{role}: done in {wall:.1f}s", flush=True)

    summary = report(results, args.steps)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "summary": summary}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
