"""Pruning under Lightning's DeepSpeed ZeRO-2/3 on CPU: 2 gloo ranks (``pytest -k deepspeed`` selects these).

Each case runs tests/distributed/deepspeed_prune.py as its own process tree on a free port (Lightning re-launches
the command for rank 1), through a test-only DeepSpeedStrategy subclass that lets DeepSpeed run on CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_llama

from mosaic_lightning import PruningConfig, prune_model

SCRIPT = Path(__file__).parent / "distributed" / "deepspeed_prune.py"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "DS_BUILD_OPS": "0", **extra}  # fmt: skip


def _run(tmp_path: Path, stage: int, method: str, allocation: str, *flags: str) -> list[dict]:
    env = _env(MASTER_PORT=str(_free_port()))
    command = [sys.executable, str(SCRIPT), str(tmp_path), str(stage), method, allocation, *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _pruned_nonzero(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> int:
    return sum(int((weights[n][~keep] != 0).sum()) for n, keep in masks.items())


def _check_ranks(ranks: list[dict], stage: int, method: str, allocation: str, true_sequential: bool = False) -> None:
    """Everything a 2-rank ZeRO run must hold, whatever the options."""
    _check_ranks_agree(ranks, stage)
    # One process calibrated on the union of both ranks' batches reaches the same masks.
    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_prune import calibration

    torch.manual_seed(0)
    config = PruningConfig(0.5, method, allocation, true_sequential=true_sequential)
    single = prune_model(make_llama(), calibration(), config, progress=False)
    masks = ranks[0]["masks"]
    agree = sum(int((single.masks.masks[n] == k).sum()) for n, k in masks.items())
    total = sum(k.numel() for k in masks.values())
    floor = 0.99 if method == "sparsellm" else 0.999  # summation order moves ~1% of SparseLLM's masks: test_distributed
    assert agree / total > floor, f"only {agree}/{total} mask entries agree with the single-process run"


def _check_ranks_agree(ranks: list[dict], stage: int) -> None:
    """Partitioned (ZeRO-3), the same masks on both ranks, pruned entries zero in the visible weights, the fp32
    master and the Adam moments, before and after training, and training moved the kept weights alike."""
    masks = ranks[0]["masks"]
    assert all(r["world_size"] == 2 and r["engine_type"] == "DeepSpeedEngine" for r in ranks)
    part = ranks[0]["partition"]
    if stage == 3:  # really partitioned: no rank holds the whole parameter
        assert part["data_numel"] == 0 and part["local_numel"] < part["full_numel"], part
    for name, keep in masks.items():
        assert torch.equal(ranks[1]["masks"][name], keep), f"{name}: masks differ between ranks"
        assert 0 < int((~keep).sum()) < keep.numel()
    for r in ranks:
        pruned, trained = r["pruned"], r["trained"]
        assert trained["global_step"] == 3
        for snapshot in (pruned, trained):  # fp32 training: the master is what the model shows
            assert _pruned_nonzero(snapshot["visible"], masks) == 0, "visible pruned weights not zero"
            assert _pruned_nonzero(snapshot["master"], masks) == 0, "fp32 master regrew pruned weights"
            for name in masks:
                torch.testing.assert_close(snapshot["master"][name], snapshot["visible"][name], rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            assert _pruned_nonzero(trained["moments"][key], masks) == 0, f"{key} of pruned entries not zero"
        # Training really moved the kept weights.
        assert any(not torch.equal(trained["visible"][n][k], pruned["visible"][n][k]) for n, k in masks.items())
    for name in masks:
        torch.testing.assert_close(ranks[1]["trained"]["visible"][name], ranks[0]["trained"]["visible"][name],
                                   rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "method", "allocation"),
    [(2, "wanda", "uniform"), (3, "sparsegpt", "mosaic"), (3, "sparsellm", "mosaic")],
)
def test_deepspeed_prune_train_checkpoint_resume_convert(tmp_path, stage, method, allocation):
    ranks = _run(tmp_path, stage, method, allocation, "resume")
    _check_ranks(ranks, stage, method, allocation)
    masks = ranks[0]["masks"]
    for r in ranks:  # resumed from the ZeRO checkpoint in a fresh Trainer: same masks, zeros held
        assert all(torch.equal(r["resumed_masks"][n], k) for n, k in masks.items())
        assert r["resumed"]["global_step"] == 5
        assert _pruned_nonzero(r["resumed"]["visible"], masks) == 0
        assert _pruned_nonzero(r["resumed"]["master"], masks) == 0
    # zero_to_fp32 conversion of the checkpoint (taken after step 3) is the pruned fp32 master, zeros included.
    converted = ranks[0]["converted"]
    assert _pruned_nonzero(converted, masks) == 0
    for name in masks:
        torch.testing.assert_close(converted[name], ranks[0]["trained"]["master"][name], rtol=0, atol=0)


def test_deepspeed_zero3_true_sequential(tmp_path):
    """Under ZeRO-3 the staged passes cannot stop early (DeepSpeed's gathers); they run on, with the same masks."""
    ranks = _run(tmp_path, 3, "sparsegpt", "uniform", "true_sequential")
    _check_ranks(ranks, 3, "sparsegpt", "uniform", true_sequential=True)


def test_deepspeed_zero3_msp_search(tmp_path):
    """MSP under ZeRO-3: the Fisher pass from activations (no rank holds a whole weight), the fitness with one
    module gathered at a time; the same sensitivities as one process on the union of the batches, the same search
    on both ranks, and the exact weighted mean."""
    from mosaic_lightning.allocation import AllocationContext
    from mosaic_lightning.allocation.msp import fisher_trace
    from mosaic_lightning.core.adapters import ModelAdapter

    ranks = _run(tmp_path, 3, "wanda", "msp")
    _check_ranks_agree(ranks, 3)
    assert ranks[0]["allocation"]["best"] == ranks[1]["allocation"]["best"]
    assert ranks[0]["allocation"]["history"] == ranks[1]["allocation"]["history"]
    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_prune import calibration

    torch.manual_seed(0)
    model = make_llama()
    single = fisher_trace(AllocationContext(model, ModelAdapter(model), calibration(), progress=False), [0, 1], 8)
    assert ranks[0]["allocation"]["fisher_trace"] == pytest.approx(single, rel=1e-5)
    first = ranks[0]["allocation"]["history"][0]
    assert first["mean"] > first["best"]  # candidates' masks were really applied: their fitness differs
    masks = ranks[0]["masks"]
    pruned = sum(int((~k).sum()) for k in masks.values())
    assert pruned == round(0.5 * sum(k.numel() for k in masks.values()))
    dense = dict(model.named_parameters())  # Wanda keeps weights as they are: the search restored them exactly
    for name, keep in masks.items():
        torch.testing.assert_close(ranks[0]["pruned"]["visible"][name][keep], dense[name].detach()[keep],
                                   rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize(("stage", "method", "allocation"), [(2, "sparsegpt", "mosaic"), (3, "wanda", "uniform")])
def test_deepspeed_cpu_offload(tmp_path, stage, method, allocation):
    """ZeRO-2 with the optimizer offloaded, ZeRO-3 with optimizer and parameters offloaded (to CPU)."""
    ranks = _run(tmp_path, stage, method, allocation, "offload")
    assert all(r["offload"] for r in ranks)
    _check_ranks(ranks, stage, method, allocation)


def test_deepspeed_masking_visible_weights_alone_regrows_in_fp32_master(tmp_path):
    """Without the master-weight fix (visible weights masked after every step, as under DDP), DeepSpeed's fp32
    master copy keeps every pruned weight and the optimizer moves it: the next step, a checkpoint or a
    zero_to_fp32 conversion brings them back."""
    ranks = _run(tmp_path, 3, "wanda", "mosaic", "nofix")
    masks = ranks[0]["masks"]
    num_pruned = sum(int((~k).sum()) for k in masks.values())
    for r in ranks:
        assert _pruned_nonzero(r["trained"]["visible"], masks) == 0  # looks pruned ...
        assert _pruned_nonzero(r["trained"]["master"], masks) > 0.99 * num_pruned  # ... but is dense underneath


def test_deepspeed_two_nodes_on_loopback(tmp_path):
    """num_nodes=2, devices=1: one process per "node", started as a cluster launcher would (NODE_RANK)."""
    port = str(_free_port())
    command = [sys.executable, str(SCRIPT), str(tmp_path), "3", "wanda", "mosaic", "multinode"]
    procs = [
        subprocess.Popen(
            command,
            env=_env(MASTER_PORT=port, NODE_RANK=str(node), LOCAL_RANK="0"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for node in range(2)
    ]
    errors = [proc.communicate(timeout=400)[1] for proc in procs]
    for proc, err in zip(procs, errors, strict=True):
        assert proc.returncode == 0, err[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    _check_ranks(ranks, 3, "wanda", "mosaic")
