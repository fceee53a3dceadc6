"""One prepared run of the GPU figures (about 5 minutes on one large GPU); ``--device cpu --tiny`` runs the same code
on a tiny random model in seconds (tests/test_gpu_bench.py does, so it never rots).

    python bench/gpu.py --model /path/to/hf-model-dir            # on a GPU machine: the full run
    python bench/gpu.py --device cpu --tiny                       # the smoke run

Parts, each written to ``<out>/<part>.json`` as soon as it finishes (``--out``, default ``bench/out/gpu``), then a
table of all of them:

- ``prune_time``: Wanda, SparseGPT and the default Mosaic recipe (SparseGPT + Mosaic allocation, as
  ``recipes/mosaic-50.yaml``) at 50%, in bfloat16 and float32, on a random-initialised 1B-class Llama (Llama-3.2-1B
  shapes; a 135M model is launch-bound on a large GPU), each against one forward pass over the same calibration
  tokens.
- ``mask_agreement``: Wanda and SparseGPT at 50% on ``--model`` (else the random model) loaded in float32 and in
  bfloat16: the share of mask entries that agree, and held-out perplexity of both when ``--model`` is given.
- ``shrink_speed``: StructPrune at 30% with ``uniform_structure`` (whole MLP channels and heads), compacted with
  ``compact_model``, against dense: prefill tokens/s, decode tokens/s at batch 1 and 8, peak GPU memory.
- ``semi_structured_24``: 2:4 masks (the library's ``2:4`` pattern) through ``torch.sparse.to_sparse_semi_structured``
  against dense matmuls on the 1B config's projection shapes (skipped where unsupported, e.g. on the CPU).
- ``host_syncs``: the block loop with the GPU as execution device and the model in host memory, CUDA's own sync
  debug mode counting synchronising calls per block (on the CPU tests/test_device_hygiene.py counts them).
- ``zero3_fit``: a one-GPU Lightning + DeepSpeed ZeRO-3 fit with MosaicPruning holding its masks through training
  steps (skipped without CUDA or deepspeed).

Every part is wrapped: a failure or missing dependency is recorded as ``skipped`` with the reason and the run goes
on. Parts that would start after ``--budget-s`` seconds are skipped too, so the run stays within its budget.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

PARTS = ["prune_time", "mask_agreement", "semi_structured_24", "host_syncs", "shrink_speed", "zero3_fit"]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# Llama-3.2-1B's shapes (random weights): hidden 2048, MLP 8192, 16 layers, 32 query / 8 KV heads.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)


class Skip(Exception):
    """A part cannot run here (missing device, dependency or time); the message says why."""


# -- helpers ------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_time(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _random_llama(args, dtype: torch.dtype, seed: int = 0, layers: int | None = None):
    """The 1B-class (or, ``--tiny``, a tiny) Llama with seeded random weights, on the device, in ``dtype``; the
    same seed gives the same values (bfloat16 ones rounded from them). ``layers``: fewer decoder blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = LLAMA_TINY if args.tiny else LLAMA_1B
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers or shape["num_hidden_layers"]})
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _random_batches(args, vocab: int, samples: int | None = None, seed: int = 1) -> list[torch.Tensor]:
    samples = samples or args.calibration_samples
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, args.seq_len), generator=g)
    return list(ids.split(args.batch_size))


def _forward_seconds(model, batches, device: torch.device) -> float:
    def run():
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.to(device), use_cache=False)

    run()  # warm-up (kernels, allocator)
    return _timed(run, device)


def _keep_masks(outcome) -> dict[str, torch.Tensor]:
    return {name: keep.cpu() for name, keep in outcome.masks.masks.items()}


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    equal = sum(int((a[n] == b[n]).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    pruned_a = sum(int((~a[n]).sum()) for n in a)
    both = sum(int((~a[n] & ~b[n]).sum()) for n in a)
    return {"entries_equal": equal / total, "pruned_in_both": both / max(pruned_a, 1)}


# -- parts --------------------------------------------------------------------------------------------------------
def part_prune_time(args) -> tuple[dict, list]:
    from mosaic_lightning import PruningConfig, prune_model
    from mosaic_lightning.allocation import Mosaic
    from mosaic_lightning.methods import SparseGPT

    device = torch.device(args.device)
    recipes = {
        "wanda": lambda: PruningConfig(0.5, "wanda", "uniform"),
        "sparsegpt": lambda: PruningConfig(0.5, "sparsegpt", "uniform"),
        "mosaic (sparsegpt+mosaic)": lambda: PruningConfig(0.5, SparseGPT(blocksize=128, damp=0.01),
                                                           Mosaic(threshold=5.0, lam=0.08)),
    }
    results, rows = {}, []
    for dtype_name, dtype in DTYPES.items():
        for recipe, config in recipes.items():
            model = _random_llama(args, dtype)
            batches = _random_batches(args, model.config.vocab_size)
            forward = _forward_seconds(model, batches, device)
            _reset_peak(device)
            seconds = _timed(lambda m=model, b=batches, c=config: prune_model(m, b, c(), progress=False), device)
            entry = {"prune_s": seconds, "forward_s": forward, "prune_over_forward": seconds / forward,
                     "peak_memory_mb": _peak_mb(device)}
            results[f"{recipe}/{dtype_name}"] = entry
            rows.append((f"{recipe} {dtype_name}", f"prune {seconds:.2f} s = {seconds / forward:.0f}x one forward "
                                                   f"({forward:.3f} s)"))
            del model
            _free(device)
    info = {"model": "tiny random Llama" if args.tiny else "random Llama, Llama-3.2-1B shapes",
            "calibration": f"{args.calibration_samples} x {args.seq_len} tokens, batch {args.batch_size}"}
    return {"setup": info, "runs": results}, rows


def _agreement_model(args, dtype: torch.dtype):
    if args.model is None:
        return _random_llama(args, dtype), None
    from mosaic_lightning.core.assets import load_causal_lm, load_tokenizer

    model = load_causal_lm(args.model, dtype=dtype).to(args.device).eval()
    return model, load_tokenizer(args.model)


def _held_out(args, tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Calibration windows from the bundled Wikipedia's first 80 articles, held-out windows from the last 20."""
    try:
        from mosaic_lightning.core.assets import wikipedia_split

        train, test = wikipedia_split()  # needs the gensim package (the bundled text); random tokens without it
    except Exception as err:
        print(f"[mask_agreement] no bundled Wikipedia text ({type(err).__name__}: {err}); random calibration tokens, "
              "no perplexity", flush=True)
        return None

    def windows(texts, count, seed):
        ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
        usable = ids[: len(ids) // args.seq_len * args.seq_len].view(-1, args.seq_len)
        order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))[:count]
        return list(usable[order].split(args.batch_size))

    return windows(train, args.calibration_samples, 0), windows(test, args.eval_windows, 1)


def part_mask_agreement(args) -> tuple[dict, list]:
    from mosaic_lightning import PruningConfig, perplexity, prune_model

    device = torch.device(args.device)
    results, rows = {}, []
    for method in ("wanda", "sparsegpt"):
        masks, ppl = {}, {}
        for dtype_name, dtype in DTYPES.items():
            model, tokenizer = _agreement_model(args, dtype)
            data = _held_out(args, tokenizer) if tokenizer is not None else None
            calibration = data[0] if data else _random_batches(args, model.config.vocab_size)
            outcome = prune_model(model, calibration, PruningConfig(0.5, method, "uniform"), progress=False)
            masks[dtype_name] = _keep_masks(outcome)
            if data:
                ppl[dtype_name] = perplexity(model, [b.to(device) for b in data[1]], progress=False)
            del model
            _free(device)
        entry = _agreement(masks["bfloat16"], masks["float32"])
        entry["perplexity"] = ppl or None
        results[method] = entry
        text = f"masks agree {entry['entries_equal']:.4f}, pruned in both {entry['pruned_in_both']:.4f}"
        if ppl:
            text += f"; ppl bf16 {ppl['bfloat16']:.2f} vs fp32 {ppl['float32']:.2f}"
        rows.append((method, text))
    source = args.model or ("tiny random Llama" if args.tiny else "random Llama, Llama-3.2-1B shapes")
    return {"model": source, "methods": results}, rows


def _speed(model, args, device: torch.device) -> dict:
    """Prefill tokens/s (batch 1), decode tokens/s at batch 1 and 8 (greedy, KV cache), peak memory of each."""
    vocab = model.config.vocab_size
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(3)
    prompt_len, new = (8, 8) if args.tiny else (128, 128)
    prefill_ids = torch.randint(0, vocab, (1, args.seq_len), generator=g).to(device)
    out = {"params": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        _reset_peak(device)
        seconds = _median_time(lambda: model(input_ids=prefill_ids, use_cache=False), device, args.repeats)
        out["prefill_tokens_per_s"] = args.seq_len / seconds
        out["prefill_peak_mb"] = _peak_mb(device)
        for batch in (1, 8):
            prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)

            def generate(p=prompt):
                model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False)

            _reset_peak(device)
            seconds = _median_time(generate, device, args.repeats)
            out[f"decode_b{batch}_tokens_per_s"] = batch * new / seconds
            out[f"decode_b{batch}_peak_mb"] = _peak_mb(device)
    return out


def part_shrink_speed(args) -> tuple[dict, list]:
    from mosaic_lightning import PruningConfig, compact_model, prune_model

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" or args.tiny else torch.float32
    model = _random_llama(args, dtype)
    dense = _speed(model, args, device)
    config = PruningConfig(0.3, "structprune", "uniform", structured_fraction=1.0, uniform_structure=True)
    batches = _random_batches(args, model.config.vocab_size)
    outcome = prune_model(model, batches, config, progress=False)
    compact_model(model, outcome.structure)
    shrunk = _speed(model, args, device)
    del model
    _free(device)
    rows = []
    for key in ("params", "prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s",
                "decode_b8_peak_mb"):
        if dense[key] is None:
            rows.append((key, "n/a (not a CUDA device)"))
        else:
            rows.append((key, f"dense {dense[key]:,.0f} -> 30% shrunk {shrunk[key]:,.0f} "
                              f"({shrunk[key] / dense[key]:.2f}x)"))
    return {"dtype": str(dtype), "recipe": "structprune 30%, uniform_structure, compact_model",
            "achieved_sparsity": outcome.report.achieved_sparsity, "dense": dense, "compacted": shrunk}, rows


def part_semi_structured_24(args) -> tuple[dict, list]:
    device = torch.device(args.device)
    if device.type != "cuda":
        raise Skip("torch.sparse.to_sparse_semi_structured needs a CUDA GPU (compute capability 8.0+)")
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        raise Skip(f"compute capability {major}.x; semi-structured sparsity needs 8.0+")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from mosaic_lightning.core.patterns import parse_pattern

    shape = LLAMA_TINY if args.tiny else LLAMA_1B
    d, ff, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    head_dim = d // shape["num_attention_heads"]
    projections = {"q/o": (d, d), "k/v": (kv * head_dim, d), "gate/up": (ff, d), "down": (d, ff)}
    pattern = parse_pattern("2:4")
    results, rows = {}, []
    backend = "cutlass" if getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False) else "cusparselt (default)"
    for name, (out_f, in_f) in projections.items():
        torch.manual_seed(0)
        weight = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16)
        keep = pattern.keep_mask(weight.abs().float(), weight.numel() // 2)
        dense_w = weight * keep
        sparse_w = to_sparse_semi_structured(dense_w)
        for tokens in (16, 512, 4096):
            x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
            expected = torch.nn.functional.linear(x, dense_w)
            got = torch.nn.functional.linear(x, sparse_w)
            error = float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
            t_dense = _median_time(lambda x=x, w=dense_w: torch.nn.functional.linear(x, w), device, 20, warmup=3)
            t_sparse = _median_time(lambda x=x, w=sparse_w: torch.nn.functional.linear(x, w), device, 20, warmup=3)
            results[f"{name}/{tokens}"] = {"shape": [out_f, in_f], "tokens": tokens, "dense_ms": t_dense * 1e3,
                                           "sparse_ms": t_sparse * 1e3, "speedup": t_dense / t_sparse,
                                           "max_rel_error": error}
            rows.append((f"{name} [{out_f}x{in_f}] x {tokens} tokens",
                         f"dense {t_dense * 1e3:.3f} ms, 2:4 {t_sparse * 1e3:.3f} ms ({t_dense / t_sparse:.2f}x)"))
    return {"backend": backend, "dtype": "bfloat16", "matmuls": results}, rows


def part_host_syncs(args) -> tuple[dict, list]:
    device = torch.device(args.device)
    if device.type != "cuda":
        raise Skip("CUDA's sync debug mode needs a CUDA device; on the CPU tests/test_device_hygiene.py counts syncs")
    results, rows = {}, []
    for method in ("wanda", "sparsegpt"):
        results[method] = _count_syncs(args, method, device)
        rows.append((method, f"syncs per block (CUDA sync debug mode) {results[method]['syncs_per_block']}; "
                             f"statistics on {results[method]['statistics_devices']}"))
    return results, rows


def _count_syncs(args, method: str, device: torch.device) -> dict:
    """Prune the model held in host memory with ``device`` as execution device, counting the warnings of CUDA's
    sync debug mode (every synchronising call) per block, and where the statistics were allocated."""
    import warnings

    from mosaic_lightning import PruningConfig, prune_model
    from mosaic_lightning.calibration import stats as stats_module
    from mosaic_lightning.core.adapters import ModelAdapter
    from mosaic_lightning.core.residency import BlockResidency

    class Counting(BlockResidency):
        layer = None

        def load(self, layer):
            super().load(layer)
            self.layer = layer

        def unload(self, layer):
            self.layer = None
            super().unload(layer)

    # the model stays in host memory (2 blocks of the 1B shapes: the per-block counts are what is measured)
    model = _random_llama(argparse.Namespace(**{**vars(args), "device": "cpu"}), torch.bfloat16, layers=2)
    adapter = ModelAdapter(model)
    residency = Counting(adapter, device)
    batches = _random_batches(args, model.config.vocab_size)
    counts: dict[int, int] = {}
    stats_devices: set[str] = set()
    original = stats_module.InputStatistics.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        stats_devices.add(str(self.sq_sum.device))

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message) and residency.layer is not None:
            counts[residency.layer] = counts.get(residency.layer, 0) + 1

    stats_module.InputStatistics.__init__ = spy
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            prune_model(model, batches, PruningConfig(0.5, method), adapter=adapter, progress=False,
                        residency=residency)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        stats_module.InputStatistics.__init__ = original
    result = {"syncs_per_block": [counts.get(layer, 0) for layer in range(adapter.num_layers)],
              "statistics_devices": sorted(stats_devices), "weights_device_after": str(next(model.parameters()).device)}
    del model
    _free(device)
    return result


def part_zero3_fit(args) -> tuple[dict, list]:
    device = torch.device(args.device)
    if device.type != "cuda":
        raise Skip("a one-GPU DeepSpeed ZeRO-3 fit needs CUDA")
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # ImportError, or a broken build raising something else
        raise Skip(f"deepspeed is not importable: {type(err).__name__}: {err}") from err
    result_file = pathlib.Path(args.out) / "zero3_fit.child.json"
    command = [sys.executable, __file__, "--zero3-child", str(result_file), "--device", args.device,
               *(["--tiny"] if args.tiny else [])]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29531")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(30, args.remaining()))
    if done.returncode != 0:
        raise RuntimeError(f"the ZeRO-3 child exited {done.returncode}: {done.stderr[-1500:]}")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    rows = [("masks held after training", f"{result['pruned_nonzero']} pruned weights nonzero after "
                                          f"{result['steps']} steps; sparsity {result['zero_fraction']:.4f}"),
            ("fit", f"{result['fit_s']:.1f} s, peak {result['peak_memory_mb']:.0f} MB")]
    return result, rows


def zero3_child(out_file: str, device: str, tiny: bool) -> None:
    """The ZeRO-3 fit, in its own process (DeepSpeed sets up torch.distributed)."""
    import lightning as L
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from transformers import LlamaConfig, LlamaForCausalLM

    from mosaic_lightning import MosaicPruning
    from mosaic_lightning.core.masks import named_parameters
    from mosaic_lightning.core.zero import gathered_params

    shape = LLAMA_TINY if tiny else dict(LLAMA_1B, num_hidden_layers=4)

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = None

        def configure_model(self):  # under zero.Init: partitioned from the start
            if self.model is None:
                torch.manual_seed(0)
                self.model = LlamaForCausalLM(LlamaConfig(**shape))

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch, use_cache=False).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    vocab, seq = shape["vocab_size"], 32 if tiny else 512
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (16, seq), generator=g)
    calibration = list(torch.randint(0, vocab, (8, seq), generator=g).split(4))
    callback = MosaicPruning(sparsity=0.5, method="wanda", allocation="uniform", verbose=False,
                             calibration_dataloader=calibration)
    steps = 4
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=DeepSpeedStrategy(stage=3), precision="bf16-mixed",
                        max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    module = LM()
    start = time.perf_counter()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    fit_s = time.perf_counter() - start
    params = named_parameters(module.model)
    nonzero = zeros = total = 0
    for name, keep in callback.masks.masks.items():
        with gathered_params([params[name]]):
            weight = params[name].detach()
            keep = keep.to(weight.device)
            nonzero += int((weight[~keep] != 0).sum())
            zeros += int((weight == 0).sum())
            total += weight.numel()
    pathlib.Path(out_file).write_text(json.dumps({
        "steps": trainer.global_step, "pruned_nonzero": nonzero, "zero_fraction": zeros / total, "fit_s": fit_s,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "layers": shape["num_hidden_layers"],
        "achieved_sparsity": callback.report.achieved_sparsity}))


PART_FUNCTIONS = {
    "prune_time": part_prune_time,
    "mask_agreement": part_mask_agreement,
    "shrink_speed": part_shrink_speed,
    "semi_structured_24": part_semi_structured_24,
    "host_syncs": part_host_syncs,
    "zero3_fit": part_zero3_fit,
}


def environment(args) -> dict:
    device = torch.device(args.device)
    env = {"device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "host": platform.node(), "tiny": args.tiny}
    if device.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    with contextlib.suppress(Exception):
        import transformers

        env["transformers"] = transformers.__version__
    return env


def run_part(name: str, args, env: dict) -> dict:
    start = time.perf_counter()
    record = {"part": name, "status": "ok", "reason": None, "seconds": None, "environment": env, "results": None,
              "rows": []}
    try:
        if args.remaining() <= 0:
            raise Skip(f"time budget of {args.budget_s:.0f} s (--budget-s) used up before this part")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise Skip("CUDA is not available in this torch build / machine")
        results, rows = PART_FUNCTIONS[name](args)
        record["results"], record["rows"] = results, [list(r) for r in rows]
    except Skip as skip:
        record["status"], record["reason"] = "skipped", str(skip)
    except Exception as err:  # a failure is recorded and the run goes on
        record["status"] = "skipped"
        record["reason"] = f"failed: {type(err).__name__}: {err}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
    record["seconds"] = time.perf_counter() - start
    _free(torch.device(args.device) if not args.device.startswith("cuda") or torch.cuda.is_available()
          else torch.device("cpu"))
    path = pathlib.Path(args.out) / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def print_table(records: list[dict], env: dict) -> None:
    print()
    print(f"bench/gpu.py on {env.get('gpu', env['device'])} (torch {env['torch']}, tiny={env['tiny']})")
    width = 34
    print(f"{'part':<20} {'status':<8} {'seconds':>8}  figures")
    print("-" * 110)
    for record in records:
        head = f"{record['part']:<20} {record['status']:<8} {record['seconds']:>8.1f}  "
        if record["status"] != "ok":
            print(head + record["reason"].splitlines()[0][:200])
            continue
        if not record["rows"]:
            print(head)
        for i, (label, value) in enumerate(record["rows"]):
            print((head if i == 0 else " " * len(head)) + f"{label[:width]:<{width}} {value}")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local HF model directory for the agreement/quality part")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: the whole run in seconds")
    parser.add_argument("--out", default="bench/out/gpu", help="folder for one JSON per part")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="parts that would start later are skipped (default 300; none with --tiny)")
    parser.add_argument("--calibration-samples", type=int, default=None,
                        help="default 128 as the recipes (tiny: 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 512 (tiny: 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny: 2)")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows for perplexity (--model)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (median); default 3 (tiny: 1)")
    parser.add_argument("--zero3-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zero3_child:
        zero3_child(args.zero3_child, args.device, args.tiny)
        return 0
    args.calibration_samples = args.calibration_samples or (4 if args.tiny else 128)
    args.seq_len = args.seq_len or (32 if args.tiny else 512)
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.budget_s = args.budget_s if args.budget_s is not None else (float("inf") if args.tiny else 300.0)
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and far faster on a busy machine
    started = time.perf_counter()
    args.remaining = lambda: args.budget_s - (time.perf_counter() - started)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in names if p not in PART_FUNCTIONS]
    if unknown:
        parser.error(f"--parts {unknown}; allowed values: {PARTS}")
    env = environment(args)
    records = []
    for name in names:
        records.append(run_part(name, args, env))
        print(f"[{name}] {records[-1]['status']} in {records[-1]['seconds']:.1f} s", flush=True)
    print_table(records, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
