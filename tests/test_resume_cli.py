"""Resuming through the CLI: ``train.py fit --ckpt_path <mid-run checkpoint>`` finishes the run and exports exactly
what the uninterrupted run exports (masks identical, weights equal, the same ``pruning_report.json`` apart from
timings), for one-shot + fine-tuning, LoRA recovery, Gradual, ADMM and structure removal with distillation (the
resumed run reports the dense and compacted perplexities its first run measured), also after the process was
SIGKILLed.

The training text is 6 batches per epoch, so a resume from step 3 starts mid-epoch and crosses an epoch boundary;
the learning rate is high enough that a different batch order shows in the weights.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
RECIPES = {
    "wanda-50": [],  # one-shot prune at fit start, then fine-tuning with the masks held
    "mosaic-50-lora": [],
    "mosaic-gradual-70": ["--pruning.schedule.init_args.end_step", "8", "--pruning.schedule.init_args.every_n_steps",
                          "2", "--pruning.schedule.init_args.calibration_batches", "2"],
    "admm-80": ["--pruning.schedule.init_args.projection_every", "2"],
    "shrink-30": [],  # compacted before training, distilled from the dense model; resumed into compacted shapes
}  # fmt: skip
CHECKPOINT_EVERY_3_STEPS = [
    "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps", "3", "--trainer.callbacks.save_top_k", "-1",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny model, 12 training windows of 16 tokens (6 batches of 2) and a longer held-out text."""
    folder = tmp_path_factory.mktemp("resume")
    save_tiny_llama(folder / "tiny")
    (folder / "train.txt").write_text(" ".join(f"word{i % 97} and more text number {i}." for i in range(20)))
    (folder / "eval.txt").write_text(" ".join(f"other{i % 89} words, line {i}." for i in range(300)))
    return folder


def _command(workdir: Path, recipe: str, export: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / f"recipes/{recipe}.yaml"),
            "--model.pretrained", str(workdir / "tiny"), "--model.learning_rate", "0.01",
            "--data.train_files", str(workdir / "train.txt"), "--data.eval_files", str(workdir / "eval.txt"),
            "--data.seq_len", "16", "--data.batch_size", "2", "--data.num_calibration_samples", "4",
            "--data.max_eval_windows", "4", "--trainer.logger", "false", "--trainer.max_steps", str(STEPS),
            "--export_dir", str(export), *RECIPES[recipe], *extra]  # fmt: skip


def _run(workdir: Path, recipe: str, export: Path, *extra: str) -> None:
    result = subprocess.run(_command(workdir, recipe, export, *extra), cwd=workdir, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def _uninterrupted(workdir: Path, recipe: str) -> tuple[Path, Path]:
    """The run straight through (checkpoints every 3 steps on the way), once per recipe: (export, checkpoints)."""
    export, checkpoints = workdir / f"{recipe}-straight", workdir / f"{recipe}-ckpt"
    if not export.exists():
        _run(workdir, recipe, export, *CHECKPOINT_EVERY_3_STEPS, "--trainer.callbacks.dirpath", str(checkpoints))
    return export, checkpoints


def _comparable(report: dict) -> dict:
    """The report without what measures time or memory (those differ between any two runs)."""
    kept = {k: v for k, v in report.items() if k not in ("timings_s", "peak_memory_mb") and not k.endswith("_eval_s")}
    kept["projections"] = [{k: v for k, v in p.items() if k != "seconds"} for p in report["projections"]]
    return kept


def assert_same_export(expected: Path, actual: Path) -> None:
    assert sorted(p.name for p in actual.iterdir()) == sorted(p.name for p in expected.iterdir())
    want, got = load_file(expected / "model.safetensors"), load_file(actual / "model.safetensors")
    assert got.keys() == want.keys()
    for name, weight in want.items():
        assert torch.equal(got[name] == 0, weight == 0), f"{name}: the pruning mask differs"
        torch.testing.assert_close(got[name], weight, rtol=0, atol=1e-6, msg=f"{name} differs")
    reports = [json.loads((d / "pruning_report.json").read_text()) for d in (expected, actual)]
    assert _comparable(reports[1]) == _comparable(reports[0])
    assert "ppl_dense" in reports[1] and "ppl_pruned" in reports[1]
    if "params_after_compaction" in reports[0]:  # compacted before training: restored from the checkpoint
        assert "ppl_compacted" in reports[1]
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (actual / name).read_bytes() == (expected / name).read_bytes(), name


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_resumed_cli_run_exports_what_the_uninterrupted_run_exports(workdir, recipe):
    expected, checkpoints = _uninterrupted(workdir, recipe)
    resumed = workdir / f"{recipe}-resumed"
    _run(workdir, recipe, resumed, "--ckpt_path", str(checkpoints / "epoch=0-step=3.ckpt"))
    assert_same_export(expected, resumed)


def test_run_killed_after_a_checkpoint_resumes_to_the_same_export(workdir):
    recipe = "admm-80"
    expected, _ = _uninterrupted(workdir, recipe)
    killed, checkpoints = workdir / "killed", workdir / "killed-ckpt"
    command = _command(workdir, recipe, killed, *CHECKPOINT_EVERY_3_STEPS, "--trainer.callbacks.dirpath",
                       str(checkpoints))  # fmt: skip
    process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (checkpoints / "epoch=0-step=6.ckpt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint at step 6"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-training"
    assert not killed.exists()
    resumed = workdir / "killed-resumed"
    _run(workdir, recipe, resumed, "--ckpt_path", str(checkpoints / "epoch=0-step=3.ckpt"))
    assert_same_export(expected, resumed)
