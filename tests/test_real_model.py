"""End-to-end checks on the bundled real model (SmolLM2-135M) and real text (Wikipedia sample).

Small calibration sets keep these within a couple of minutes on a 2-core CPU; CI runs them.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mosaic_lightning import PruningConfig, prune_model
from mosaic_lightning.calibration.stats import InputStatistics
from mosaic_lightning.core.assets import BUNDLED_MODEL, load_causal_lm, load_tokenizer, wikipedia_split
from mosaic_lightning.core.patterns import Unstructured
from mosaic_lightning.methods import SparseGPT, Wanda

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 128


@pytest.fixture(scope="module")
def calibration_batches() -> list[torch.Tensor]:
    train, _ = wikipedia_split()
    ids = load_tokenizer(BUNDLED_MODEL)("\n\n".join(train[:4]), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 8 * SEQ_LEN]).view(8, SEQ_LEN)
    return list(windows.split(4))


def _capture_first_layer_inputs(model, batches):
    """Independent of the library: stop each forward at layer 0 and keep what it was called with."""
    captured = []

    class Stop(Exception):
        pass

    def hook(_module, args, kwargs):
        captured.append((args[0], dict(kwargs)))
        raise Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    for ids in batches:
        with contextlib.suppress(Stop):
            model(input_ids=ids, use_cache=False)
    handle.remove()
    return captured


@torch.no_grad()
def plain_sequential_wanda(model, batches, sparsity: float) -> dict[str, torch.Tensor]:
    """Wanda as the paper's reference code does it, written plainly: layer by layer, prune, re-run."""
    inputs = _capture_first_layer_inputs(model, batches)
    masks = {}
    for index, layer in enumerate(model.model.layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        handles = [
            m.register_forward_hook(
                lambda mod, args, out, n=n, seen=seen: seen[n].append(args[0].reshape(-1, args[0].shape[-1]))
            )
            for n, m in linears.items()
        ]
        for hidden, kwargs in inputs:
            layer(hidden, **kwargs)
        for h in handles:
            h.remove()
        for name, module in linears.items():
            x = torch.cat(seen[name]).double()
            norms = torch.sqrt((x * x).sum(dim=0)).float()
            score = module.weight.abs() * norms[None, :]
            prune_per_row = int(module.weight.shape[1] * sparsity)
            order = torch.sort(score, dim=-1, stable=True).indices[:, :prune_per_row]
            keep = torch.ones_like(module.weight, dtype=torch.bool)
            keep.scatter_(1, order, False)
            module.weight[~keep] = 0
            masks[f"model.layers.{index}.{name}.weight"] = keep
        inputs = [(layer(hidden, **kwargs), kwargs) for hidden, kwargs in inputs]
    return masks


def test_wanda_matches_plain_reference(calibration_batches):
    reference = plain_sequential_wanda(load_causal_lm(BUNDLED_MODEL).eval(), calibration_batches, 0.5)
    model = load_causal_lm(BUNDLED_MODEL)
    outcome = prune_model(model, calibration_batches, PruningConfig(0.5, "wanda", "uniform"), progress=False)
    assert set(outcome.masks.masks) == set(reference)
    mismatched = {n: int((outcome.masks.masks[n] != reference[n]).sum()) for n in reference}
    assert sum(mismatched.values()) == 0, {n: c for n, c in mismatched.items() if c}
    assert abs(outcome.report.achieved_sparsity - 0.5) < 1e-3


@torch.no_grad()
def test_sparsegpt_reconstructs_better_than_wanda_per_layer(calibration_batches):
    """On the same real inputs, SparseGPT's ||WX - W'X||^2 is below Wanda's for every projection tested."""
    model = load_causal_lm(BUNDLED_MODEL).eval()
    layers = [0, 15, 29]
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i in layers:
        for name, module in model.model.layers[i].named_modules():
            if isinstance(module, torch.nn.Linear):
                key = f"{i}.{name}"
                inputs[key] = []
                handles.append(module.register_forward_hook(lambda m, a, o, k=key: inputs[k].append(a[0])))
    for ids in calibration_batches:
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    for i in layers:
        errors = {"wanda": 0.0, "sparsegpt": 0.0}
        for key in [k for k in inputs if k.startswith(f"{i}.")]:
            weight = modules[f"model.layers.{key}"].weight
            x = torch.cat([a.reshape(-1, a.shape[-1]) for a in inputs[key]])
            stats = InputStatistics(key, x.shape[1], hessian=True)
            stats.update(x)
            k = weight.numel() // 2
            wanda = Wanda().prune(weight, stats, Unstructured(), k)
            sgpt = SparseGPT().prune(weight, stats, Unstructured(), k)
            assert int((~sgpt.keep).sum()) == k and int((~wanda.keep).sum()) == k
            dense_out = x @ weight.t()
            errors["wanda"] += float(((x @ (weight * wanda.keep).t() - dense_out) ** 2).sum())
            errors["sparsegpt"] += float(((x @ sgpt.weight.t() - dense_out) ** 2).sum())
        assert errors["sparsegpt"] < errors["wanda"], (i, errors)


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1200,  # the default recipe prunes with SparseGPT; generous for a loaded machine
    )


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("text")
    train, test = wikipedia_split()
    (root / "train.txt").write_text("\n\n".join(train[:6]))
    (root / "eval.txt").write_text("\n\n".join(test[:2]))
    return root / "train.txt", root / "eval.txt"


def test_cli_recipe_with_overrides_exports_loadable_model(tmp_path, text_files):
    from transformers import AutoModelForCausalLM

    export = tmp_path / "export"
    result = _run_cli(
        "--config", str(ROOT / "recipes/mosaic-50.yaml"),
        "--model.pretrained", BUNDLED_MODEL,
        "--data.train_files", f"[{text_files[0]}]",
        "--data.eval_files", f"[{text_files[1]}]",
        "--data.seq_len", str(SEQ_LEN),
        "--data.num_calibration_samples", "8",
        "--data.max_eval_windows", "4",
        "--pruning.sparsity", "0.6",
        "--trainer.logger", "false",
        "--export_dir", str(export),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "pruning_report.json").read_text())
    assert abs(report["achieved_sparsity"] - 0.6) < 1e-3
    assert report["ppl_pruned"] > report["ppl_dense"] > 1
    assert len(report["projections"]) == 30 * 7
    assert {"prune", "profile", "total"} <= set(report["timings_s"])
    assert (export / "sparsity_heatmap.png").stat().st_size > 0

    model = AutoModelForCausalLM.from_pretrained(export)
    targeted = [p for n, p in model.named_parameters() if n.endswith("_proj.weight")]
    zeros = sum(int((p == 0).sum()) for p in targeted)
    total = sum(p.numel() for p in targeted)
    assert abs(zeros / total - 0.6) < 1e-3


def test_cli_rejects_misspelt_recipe_key(tmp_path):
    recipe = (ROOT / "recipes/wanda-50.yaml").read_text().replace("  sparsity: 0.5", "  sparsty: 0.5")
    (tmp_path / "bad.yaml").write_text(recipe)
    result = _run_cli("--config", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert result.returncode != 0
    assert "sparsty" in result.stderr


def test_cli_rejects_bad_sparsity_before_loading(tmp_path):
    result = _run_cli("--config", str(ROOT / "recipes/wanda-50.yaml"), "--pruning.sparsity", "1.0", cwd=tmp_path)
    assert result.returncode != 0
    assert "sparsity" in result.stderr and "0 <= sparsity < 1" in result.stderr


def _rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm without its cast to float32 (the formula of transformers' LlamaRMSNorm)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@torch.no_grad()
def test_composite_compaction_on_real_model(calibration_batches, tmp_path, monkeypatch):
    """31% of projection weights removed as units: compacted logits equal masked ones, and plain transformers loads
    the export. Compared in float64 so that only the removed zeros differ: transformers' RMSNorm rounds its input
    to float32 whatever the model's dtype, which turns float64 summation-order noise (~1e-14, the compacted matmuls
    add the same terms in another order) into float32 steps that grow to ~1e-5 on the logits; the test computes
    the norm in the model's dtype instead."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mosaic_lightning import compact_model, save_pruned

    model = load_causal_lm(BUNDLED_MODEL)
    config = PruningConfig(0.5, "wanda", "mosaic", structured_fraction=0.62, uniform_structure=True)
    outcome = prune_model(model, calibration_batches[:1], config, progress=False)
    model.double()
    assert abs(outcome.report.achieved_sparsity - 0.5) < 1e-3
    assert outcome.report.structured_params_removed / outcome.report.params_targeted >= 0.30
    ids = calibration_batches[1][:1]
    with monkeypatch.context() as patch:
        patch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
        masked = model(input_ids=ids).logits
        before = sum(p.numel() for p in model.parameters())
        compact_model(model, outcome.structure)
        assert before - sum(p.numel() for p in model.parameters()) >= outcome.report.structured_params_removed
        torch.testing.assert_close(model(input_ids=ids).logits, masked, rtol=0, atol=1e-9)

    save_pruned(model.float(), None, tmp_path / "compacted")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "compacted", dtype=torch.float32).eval()
    assert plain.config.num_attention_heads < 9 and plain.config.intermediate_size < 1536
    torch.testing.assert_close(plain(input_ids=ids).logits.double(), masked, rtol=0, atol=1e-3)


ZERO3_ON_CPU = """
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: cpu_deepspeed.CpuDeepSpeedStrategy  # tests/distributed: DeepSpeed's own ZeRO-3 on gloo ranks
    init_args:
      config:
        zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0, stage3_prefetch_bucket_size: 0}
        zero_allow_untested_optimizer: true
        zero_force_ds_cpu_optimizer: false
        train_micro_batch_size_per_gpu: 2
"""


def test_deepspeed_cli_zero3_lora_composite_export_on_real_model(tmp_path, text_files):
    """The whole CLI job on 2 ZeRO-3 ranks: the model loads partitioned, perplexity is shared by the ranks, LoRA
    recovers, and the export is consolidated on rank 0 one module at a time, compacted and plain-loadable. From a
    cold cache (the bundled model not yet dequantized), as a user's first ZeRO-3 run is."""
    import os

    from test_deepspeed import _env, _free_port
    from transformers import AutoModelForCausalLM

    (tmp_path / "zero3.yaml").write_text(ZERO3_ON_CPU)
    export = tmp_path / "export"
    path = os.pathsep.join([str(ROOT / "tests/distributed"), os.environ.get("PYTHONPATH", "")])
    env = _env(MASTER_PORT=str(_free_port()), PYTHONPATH=path, MOSAIC_CACHE=str(tmp_path / "cold-cache"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit",
         "--config", str(ROOT / "recipes/mosaic-50-lora.yaml"), "--config", str(tmp_path / "zero3.yaml"),
         "--data.train_files", f"[{text_files[0]}]", "--data.eval_files", f"[{text_files[1]}]",
         "--data.seq_len", "64", "--data.batch_size", "2", "--data.num_calibration_samples", "4",
         "--data.max_eval_windows", "4", "--trainer.max_steps", "2", "--trainer.logger", "false",
         "--pruning.structured_fraction", "0.3", "--pruning.uniform_structure", "true", "--export_dir", str(export)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((export / "pruning_report.json").read_text())
    metrics = report  # report metrics are top-level keys
    assert abs(report["achieved_sparsity"] - 0.5) < 1e-6 and metrics["lora_rank"] == 8
    assert metrics["ppl_pruned"] > metrics["ppl_dense"] > 1
    assert metrics["params_after_compaction"] < 0.9 * metrics["params_before_compaction"]
    assert metrics["compaction_max_logit_difference"] < 1e-3

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.intermediate_size < 1536 and sum(p.numel() for p in model.parameters()) == metrics[
        "params_after_compaction"]  # fmt: skip
    targeted = [p for n, p in model.named_parameters() if n.endswith("_proj.weight")]
    nonzero = sum(int((p != 0).sum()) for p in targeted)
    assert abs(nonzero - report["params_kept"]) <= 10  # what was asked to stay, after the masked merge
