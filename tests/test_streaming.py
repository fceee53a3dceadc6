"""Streamed pruning (``--stream true``): blocks read from safetensors shards one at a time and written out shard by
shard. Checked against the in-memory engine on the same inputs: bit-identical weights, equal perplexity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_batches, write_text_files
from transformers import AutoModelForCausalLM

from mosaic_lightning import PruningConfig, perplexity, prune_model
from mosaic_lightning.allocation import OWL
from mosaic_lightning.methods import Wanda
from mosaic_lightning.streaming.job import partial_dir, prune_streamed

ROOT_DIR = Path(__file__).resolve().parents[1]
_SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2)  # fmt: skip


def _family(name: str):
    import transformers as T

    torch.manual_seed(0)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**_SIZES, tie_word_embeddings=False))
    if name == "gemma3":  # sliding-window layers with local rotary embeddings beside global ones
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_SIZES, head_dim=8, sliding_window=4,
                                                      rope_local_base_freq=10.0))  # fmt: skip
    if name == "opt":
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                            num_attention_heads=4, word_embed_proj_dim=32))  # fmt: skip
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4))


def _save_sharded(model, folder: Path) -> Path:
    """A bf16 checkpoint in several shards (the streamed source), loaded back as float32 by both paths."""
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
    return folder


def _in_memory(source: Path, config: PruningConfig, batches, eval_batches):
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    prune_model(model, batches, config, progress=False)
    return model, perplexity(model, eval_batches, progress=False)


@pytest.mark.parametrize(("family", "method", "allocation", "order"), [
    ("llama", "sparsegpt", "owl", {}),
    ("llama", "wanda", "uniform", {"sequential": False}),
    ("llama", "sparsegpt", "uniform", {"true_sequential": True}),
    ("llama", "magnitude", "uniform", {}),  # data-free: no activations at all
    ("gemma3", "wanda", "uniform", {}),
    ("gemma3", "wanda", "uniform", {"true_sequential": True}),
    ("opt", "sparsellm", "uniform", {}),  # a block-level method
    ("gpt2", "sparsegpt", "uniform", {}),  # fused c_attn, tied output embedding
])  # fmt: skip
def test_streamed_equals_in_memory(tmp_path, family, method, allocation, order):
    source = _save_sharded(_family(family), tmp_path / "source")
    assert (source / "model.safetensors.index.json").is_file()
    batches, eval_batches = random_batches(num=3), random_batches(num=2, seed=5)
    config = PruningConfig(sparsity=0.6, method=method, allocation=allocation, **order)
    report = prune_streamed(source, torch.float32, config, batches, tmp_path / "out", eval_batches, progress=False)

    again = PruningConfig(sparsity=0.6, method=method, allocation=allocation, **order)
    expected, expected_ppl = _in_memory(source, again, batches, eval_batches)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    got, want = exported.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert report.metrics["ppl_pruned"] == pytest.approx(expected_ppl, rel=1e-6)
    assert report.achieved_sparsity == pytest.approx(0.6, abs=1e-3)
    assert not partial_dir(tmp_path / "out").exists()
    written = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert written["io_bytes"]["prune"]["read"] > 0 and written["io_bytes"]["prune"]["written"] > 0


def test_at_most_one_block_is_in_memory_at_a_time(tmp_path):
    """Every block parameter stays on ``meta`` except the one block being worked on."""
    import accelerate.utils

    source = _save_sharded(_family("llama"), tmp_path / "source")
    most, real = [0], set()
    place = accelerate.utils.set_module_tensor_to_device

    def counting(module, name, device, value=None, **kwargs):
        place(module, name, device, value=value, **kwargs)
        if name.startswith("model.layers."):
            layer = name.split(".")[2]
            (real.add if str(device) != "meta" else real.discard)(layer)
            most[0] = max(most[0], len(real))

    accelerate.utils.set_module_tensor_to_device = counting
    try:
        prune_streamed(source, torch.float32, PruningConfig(0.5, "sparsegpt", "owl"), random_batches(num=2),
                       tmp_path / "out", random_batches(num=1, seed=4), progress=False)  # fmt: skip
    finally:
        accelerate.utils.set_module_tensor_to_device = place
    assert most[0] == 1 and not real


def _structured(method, allocation: str, fraction: float, uniform: bool) -> PruningConfig:
    return PruningConfig(0.5, method, allocation, structured_fraction=fraction, uniform_structure=uniform)


@pytest.mark.parametrize(("family", "method", "allocation", "fraction", "uniform"), [
    ("llama", "wanda", "uniform", 0.6, True),  # composite, one size for all layers: plain from_pretrained
    ("llama", "structprune", "energy", 1.0, False),  # StructPrune: per-layer sizes, weights refitted
    ("gpt2", "sparsegpt", "owl", 0.6, False),  # fused c_attn, tied output embedding
])  # fmt: skip
def test_streamed_composite_pruning_exports_the_compacted_model_the_in_memory_path_makes(
    tmp_path, family, method, allocation, fraction, uniform
):
    from mosaic_lightning import compact_model, load_pruned

    source = _save_sharded(_family(family), tmp_path / "source")
    batches, eval_batches = random_batches(num=3), random_batches(num=2, seed=5)
    config = _structured(method, allocation, fraction, uniform)
    report = prune_streamed(source, torch.float32, config, batches, tmp_path / "out", eval_batches, progress=False)

    expected, expected_ppl = _in_memory(source, _structured(method, allocation, fraction, uniform), batches,
                                        eval_batches)  # fmt: skip
    compact_model(expected, report.structure)
    assert report.structure and report.metrics["ppl_pruned"] == pytest.approx(expected_ppl, rel=1e-5)
    exported = (AutoModelForCausalLM.from_pretrained if uniform else load_pruned)(tmp_path / "out",
                                                                                  dtype=torch.float32)  # fmt: skip
    got, want = exported.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    sizes = [{k: v for k, v in c.to_dict().items() if k not in ("_name_or_path", "dtype")}
             for c in (exported.config, expected.config)]  # fmt: skip
    assert sizes[0] == sizes[1]
    params = sum(p.numel() for p in exported.parameters())
    assert report.metrics["params_after_compaction"] == params < report.metrics["params_before_compaction"]


def test_a_killed_composite_stream_resumes_with_its_finished_blocks_compacted(tmp_path):
    from mosaic_lightning import load_pruned

    source = _save_sharded(_family("llama"), tmp_path / "source")
    batches, eval_batches = random_batches(num=2), random_batches(num=1, seed=5)
    config = _structured(_FailsOnceAt(2), "owl", 0.6, False)
    with pytest.raises(RuntimeError, match="block 2"):
        prune_streamed(source, torch.float32, config, batches, tmp_path / "out", eval_batches, progress=False)
    saved = json.loads((partial_dir(tmp_path / "out") / "progress.json").read_text())
    assert saved["next_layer"] == 2 and set(saved["structure"]) == {"0.mlp", "0.heads", "1.mlp", "1.heads"}
    resumed = prune_streamed(source, torch.float32, config, batches, tmp_path / "out", eval_batches, progress=False)
    assert resumed.calibration["resumed_at_block"] == 2
    whole = prune_streamed(source, torch.float32, _structured("wanda", "owl", 0.6, False), batches,
                           tmp_path / "whole", eval_batches, progress=False)  # fmt: skip
    assert resumed.structure == whole.structure and resumed.metrics == whole.metrics
    got, want = (load_pruned(tmp_path / d).state_dict() for d in ("out", "whole"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_what_cannot_stream_is_refused_before_any_work(tmp_path):
    source = _save_sharded(_family("llama"), tmp_path / "source")
    with pytest.raises(ValueError, match="allocation 'msp'"):
        prune_streamed(source, torch.float32, PruningConfig(0.5, "wanda", "msp"), random_batches(), tmp_path / "out",
                       progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_a_source_without_every_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    source = _family("llama")
    source.save_pretrained(tmp_path / "source")
    state = load_file(tmp_path / "source" / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "source" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensors .*model\.layers\.1\.mlp\.up_proj\.weight"):
        prune_streamed(tmp_path / "source", torch.float32, PruningConfig(0.5, "wanda", "uniform"), random_batches(),
                       tmp_path / "out", progress=False)  # fmt: skip


# -- the CLI, as our acceptance checks run it ----------------------------------------------------------------
def _cli(tmp_path: Path, model_dir: Path, export: Path, *overrides: str, env=None,
         recipe: str = "wanda-50") -> subprocess.CompletedProcess:  # fmt: skip
    train, test = write_text_files(tmp_path)
    return subprocess.run(
        [sys.executable, str(ROOT_DIR / "train.py"), "fit", "--config", str(ROOT_DIR / f"recipes/{recipe}.yaml"),
         "--model.pretrained", str(model_dir), "--data.train_files", str(train), "--data.eval_files", str(test),
         "--data.seq_len", "32", "--data.num_calibration_samples", "8", "--data.max_eval_windows", "2",
         "--trainer.logger", "false", "--export_dir", str(export), *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def _assert_same_tensors(a: Path, b: Path) -> None:
    got, want = _tensors(a), _tensors(b)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_cli_stream_export_equals_in_memory_export(tmp_path, tiny_model_dir):
    streamed = _cli(tmp_path, tiny_model_dir, tmp_path / "streamed", "--stream", "true")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    in_memory = _cli(tmp_path, tiny_model_dir, tmp_path / "in_memory")
    assert in_memory.returncode == 0, in_memory.stderr[-3000:]
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "in_memory")
    reports = [json.loads((tmp_path / d / "pruning_report.json").read_text()) for d in ("streamed", "in_memory")]
    for key in ("ppl_dense", "ppl_pruned"):
        assert reports[0][key] == pytest.approx(reports[1][key], rel=1e-6)
    for report in reports:  # the whole run's time and peak memory, in both paths
        assert report["timings_s"]["total"] > report["timings_s"]["prune"] > 0
        peaks = report["peak_memory_mb"]
        assert peaks["total_rss"] == max(v for k, v in peaks.items() if k.endswith("_rss"))
    assert not list((tmp_path / "streamed").glob("*.partial"))
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "streamed" / "tokenizer.json").is_file()
    beside_weights = [{f.name for f in (tmp_path / d).iterdir() if not f.name.startswith("model")}
                      for d in ("streamed", "in_memory")]  # fmt: skip
    assert beside_weights[0] == beside_weights[1]
    assert {"recipe.yaml", "README.md", "pruning_report.json", "config.json"} <= beside_weights[0]
    recipes = [yaml.safe_load((tmp_path / d / "recipe.yaml").read_text()) for d in ("streamed", "in_memory")]
    assert recipes[0]["stream"] is True and recipes[1]["stream"] is False
    assert recipes[0]["pruning"] == recipes[1]["pruning"] and recipes[0]["pruning"]["sparsity"] == 0.5


def test_cli_streamed_structprune_exports_the_in_memory_compacted_model(tmp_path, tiny_model_dir):
    from mosaic_lightning import load_pruned

    for folder, stream in (("streamed", "true"), ("in_memory", "false")):
        result = _cli(tmp_path, tiny_model_dir, tmp_path / folder, "--stream", stream, recipe="structprune-30")
        assert result.returncode == 0, result.stderr[-3000:]
    got, want = (load_pruned(tmp_path / d).state_dict() for d in ("streamed", "in_memory"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    reports = [json.loads((tmp_path / d / "pruning_report.json").read_text()) for d in ("streamed", "in_memory")]
    assert reports[0]["structure"] == reports[1]["structure"] != {}
    assert reports[0]["params_after_compaction"] == reports[1]["params_after_compaction"]
    assert reports[0]["ppl_pruned"] == pytest.approx(reports[1]["ppl_pruned"], rel=1e-5)


def test_cli_stream_killed_mid_run_continues_from_the_last_block(tmp_path):
    """SIGKILL at block 2 of 4; the same command again continues there and exports what an uninterrupted run does."""
    from conftest import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tiny", layers=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT_DIR / "tests"), os.environ.get("PYTHONPATH", "")])}
    method = ["--pruning.method", "stream_killer.KillAtBlock", "--pruning.method.init_args.layer", "2",
              "--pruning.method.init_args.marker", str(tmp_path / "killed"), "--stream", "true"]  # fmt: skip
    first = _cli(tmp_path, model_dir, tmp_path / "out", *method, env=env)
    assert first.returncode == -9, first.stderr[-3000:]
    progress = json.loads((partial_dir(tmp_path / "out") / "progress.json").read_text())
    assert progress["next_layer"] == 2 and not (tmp_path / "out").exists()
    changed = _cli(tmp_path, model_dir, tmp_path / "out", *method, "--pruning.sparsity", "0.6", env=env)
    assert changed.returncode != 0 and "made with other settings" in changed.stderr

    again = _cli(tmp_path, model_dir, tmp_path / "out", *method, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["calibration"]["resumed_at_block"] == 2 and len(report["projections"]) == 4 * 7

    whole = _cli(tmp_path, model_dir, tmp_path / "whole", *method, env=env)  # the marker exists: no kill
    assert whole.returncode == 0, whole.stderr[-3000:]
    _assert_same_tensors(tmp_path / "out", tmp_path / "whole")


class _CountingOWL(OWL):
    """OWL that counts its profile passes (class-wide: the resumed run builds the same config again)."""

    calls = 0

    def allocate(self, context, target):
        type(self).calls += 1
        return super().allocate(context, target)


class _FailsOnceAt(Wanda):
    """Wanda that raises the first time it gets to block ``layer`` (a crash mid-run); the same instance, used again
    for the resumed run, prunes it."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer, self.armed = layer, True

    def prune_block(self, block):
        if block.layer == self.layer and self.armed:
            self.armed = False
            raise RuntimeError(f"stopped at block {self.layer}")
        return super().prune_block(block)


def test_a_resumed_stream_reuses_the_saved_plan_instead_of_profiling_again(tmp_path):
    from conftest import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tiny", layers=4)
    config, batches = PruningConfig(0.6, _FailsOnceAt(2), _CountingOWL()), random_batches(2)
    with pytest.raises(RuntimeError, match="block 2"):
        prune_streamed(model_dir, torch.float32, config, batches, tmp_path / "out", progress=False)
    assert _CountingOWL.calls == 1
    resumed = prune_streamed(model_dir, torch.float32, config, batches, tmp_path / "out", progress=False)
    assert _CountingOWL.calls == 1  # the plan came from the partial export, not from a second profile pass
    assert resumed.calibration["resumed_at_block"] == 2
    whole = prune_streamed(model_dir, torch.float32, config, batches, tmp_path / "whole", progress=False)
    assert _CountingOWL.calls == 2
    _assert_same_tensors(tmp_path / "out", tmp_path / "whole")
    assert [r.achieved_sparsity for r in resumed.projections] == [r.achieved_sparsity for r in whole.projections]
    assert resumed.allocation == whole.allocation


def test_cli_stream_refuses_training_steps_before_any_work(tmp_path, tiny_model_dir):
    result = _cli(tmp_path, tiny_model_dir, tmp_path / "out", "--stream", "true", "--trainer.max_steps", "3")
    assert result.returncode != 0 and "trainer.max_steps" in result.stderr
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


# -- the execution device ------------------------------------------------------------------------------------
def test_device_is_checked_at_construction():
    from mosaic_lightning import MosaicPruning

    with pytest.raises(ValueError, match="device='gpu0' is not a torch device"):
        MosaicPruning(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            MosaicPruning(device="cuda")


def test_blocks_move_to_the_execution_device_and_back(monkeypatch):
    """Every block is on the execution device while it is pruned and back home after; the result equals the
    default's. (On this CPU-only machine the 'device' is the CPU, so the move is observed, not its speed.)"""
    from conftest import make_llama

    from mosaic_lightning.core.adapters import ModelAdapter
    from mosaic_lightning.core.residency import BlockResidency

    moves: list[tuple[int, str]] = []
    original = BlockResidency.load

    def load(self, layer):
        original(self, layer)
        moves.append((layer, str(next(self.adapter.blocks[layer].parameters()).device)))

    monkeypatch.setattr(BlockResidency, "load", load)
    batches = random_batches()
    model, reference = make_llama(), make_llama()
    config = PruningConfig(0.5, "sparsegpt", "owl")
    adapter = ModelAdapter(model)
    prune_model(model, batches, config, adapter, progress=False, residency=BlockResidency(adapter, "cpu"))
    prune_model(reference, batches, PruningConfig(0.5, "sparsegpt", "owl"), progress=False)
    assert [layer for layer, _ in moves[:2]] == [0, 1] and {d for _, d in moves} == {"cpu"}
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
