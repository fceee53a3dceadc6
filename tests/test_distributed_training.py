"""Training-time callbacks on 2 gloo ranks: LoRA recovery + composite compaction + export, and Gradual re-pruning,
under DDP and DeepSpeed ZeRO-2/3 (``pytest -k "ddp or deepspeed"`` selects these).

Each case runs tests/distributed/training_callbacks.py as its own process tree on a free port.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_llama, random_batches
from test_deepspeed import _env, _free_port, _pruned_nonzero

from mosaic_lightning import PruningConfig, prune_model

SCRIPT = Path(__file__).parent / "distributed" / "training_callbacks.py"
SCALE = 8 / 4  # alpha / r in the script


def _run(tmp_path: Path, strategy: str, mode: str) -> list[dict]:
    command = [sys.executable, str(SCRIPT), str(tmp_path), strategy, mode]
    result = subprocess.run(command, env=_env(MASTER_PORT=str(_free_port())), capture_output=True, text=True,
                            timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _same_on_ranks(ranks: list[dict], key: str) -> dict[str, torch.Tensor]:
    first = ranks[0][key]
    assert first.keys() == ranks[1][key].keys()
    for name, value in first.items():
        assert torch.equal(ranks[1][key][name], value), f"{key}[{name}] differs between ranks"
    return first


def _expected_merged_model(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.nn.Module:
    """W + mask * (scale * B A), computed here from the gathered tensors, in a plain uncompacted model."""
    model = make_llama()
    state = {n: v for n, v in weights.items() if ".lora_" not in n}
    for name, keep in masks.items():
        module = name.removesuffix(".weight")
        delta = weights[f"{module}.lora_B.default.weight"] @ weights[f"{module}.lora_A.default.weight"] * SCALE
        state[name] = state[name] + keep * delta
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_ddp_and_deepspeed_lora_recovery_compaction_and_export(tmp_path, strategy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ranks = _run(tmp_path, strategy, "lora")
    masks = _same_on_ranks(ranks, "masks")
    weights = _same_on_ranks(ranks, "before_merge")  # the adapter trained in step on both ranks
    assert ranks[0]["structure"] == ranks[1]["structure"] and ranks[0]["structure"]["0.mlp"]
    assert all(r["calibration"] == {"batches": 4, "tokens": 4 * 2 * 16} for r in ranks)  # totals over both ranks
    assert _pruned_nonzero(weights, masks) == 0  # frozen pruned base
    assert all(weights[n.replace(".weight", ".lora_B.default.weight")].abs().sum() > 0 for n in masks)  # B moved
    if strategy == "zero3":
        assert all(r["lora_partitioned"] for r in ranks)  # the adapter was partitioned too
        assert [r["live_type"] for r in ranks] == ["PeftModelForCausalLM"] * 2  # the engine keeps its module tree
        assert [r["compacted_here"] for r in ranks] == [True, False]  # consolidated on rank 0 only
    else:
        assert [r["live_type"] for r in ranks] == ["LlamaForCausalLM"] * 2

    # Pruning through the adapter on 2 ranks = one plain process on the union of the calibration batches.
    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_prune import calibration

    config = PruningConfig(0.5, allocation="uniform", structured_fraction=0.5, uniform_structure=True)
    single = prune_model(make_llama(), calibration(), config, progress=False)
    assert single.structure == ranks[0]["structure"]
    agree = sum(int((single.masks.masks[n] == k).sum()) for n, k in masks.items())
    assert agree / sum(k.numel() for k in masks.values()) > 0.999

    # The export: plain from_pretrained, smaller, and the same function as the sparsity-keeping merge.
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    expected = _expected_merged_model(weights, masks)
    assert sum(p.numel() for p in exported.parameters()) < 0.85 * sum(p.numel() for p in expected.parameters())
    ids = random_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert (tmp_path / "export" / "pruning_report.json").exists()
    # Resumed from the step-2 checkpoint in a fresh Trainer: adapter, base and masks come back exactly.
    for r in ranks:
        resumed = r["resumed"]
        assert resumed["global_step"] == 3 and resumed["masks"].keys() == masks.keys()
        assert all(torch.equal(resumed["masks"][n], k) for n, k in masks.items())
        assert resumed["at_start"].keys() == r["at_step_2"].keys()
        for name, value in r["at_step_2"].items():
            assert torch.equal(resumed["at_start"][name], value), f"{name} not restored"
    adapter = PeftModel.from_pretrained(make_llama(), tmp_path / "adapter")
    for name, param in adapter.named_parameters():
        if ".lora_" in name:
            canonical = name.removeprefix("base_model.model.")
            assert torch.equal(param.detach(), weights[canonical]), name


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_ddp_and_deepspeed_gradual_reprunes_identically_on_ranks(tmp_path, strategy):
    """Each rank calibrates on its own recent batches; reduced statistics give every rank the same masks."""
    ranks = _run(tmp_path, strategy, "gradual")
    masks = _same_on_ranks(ranks, "masks")
    assert all(r["last_pruned_step"] == 2 for r in ranks)
    assert sum(int((~k).sum()) for k in masks.values()) == sum(k.numel() for k in masks.values()) // 2
    for r in ranks:
        assert _pruned_nonzero(r["visible"], masks) == 0
        if strategy != "ddp":
            assert _pruned_nonzero(r["master"], masks) == 0, "fp32 master regrew pruned weights"
    _same_on_ranks(ranks, "visible")


def test_ddp_and_deepspeed_admm_agree(tmp_path):
    """ADMM under ZeRO-2 and ZeRO-3 (penalty added to DeepSpeed's reduced fp32 gradient partitions, z-steps on the
    assembled fp32 masters) follows the same trajectory as under DDP (penalty on param.grad): same masks, same
    trained weights. rho=1 makes the penalty dominate, so a penalty lost under DeepSpeed would show."""
    runs = {}
    for strategy in ("ddp", "zero2", "zero3"):
        (tmp_path / strategy).mkdir()
        runs[strategy] = _run(tmp_path / strategy, strategy, "admm")
    reference = _same_on_ranks(runs["ddp"], "masks")
    assert all(r["z_steps"] == 3 for ranks in runs.values() for r in ranks)
    assert sum(int((~k).sum()) for k in reference.values()) == sum(k.numel() for k in reference.values()) // 2
    for strategy, ranks in runs.items():
        masks = _same_on_ranks(ranks, "masks")
        visible = _same_on_ranks(ranks, "visible")
        assert _pruned_nonzero(visible, masks) == 0
        if strategy != "ddp":
            assert _pruned_nonzero(ranks[0]["master"], masks) == 0, "fp32 master regrew pruned weights"
        agree = sum(int((masks[n] == k).sum()) for n, k in reference.items())
        assert agree / sum(k.numel() for k in reference.values()) > 0.999, strategy
        for name, value in runs["ddp"][0]["visible"].items():
            torch.testing.assert_close(visible[name], value, rtol=1e-4, atol=1e-4, msg=f"{strategy}: {name}")


def test_ddp_trains_the_model_compacted_before_training(tmp_path):
    """Pruned and compacted in setup on every rank from reduced statistics: the same structure and, after DDP
    steps, the same smaller weights on both ranks, with only the compacted parameters in the optimizer."""
    ranks = _run(tmp_path, "ddp", "shrink")
    assert ranks[0]["structure"] == ranks[1]["structure"] != {}
    _same_on_ranks(ranks, "visible")
    for r in ranks:
        assert r["optimizer_params"] == r["params"] == sum(v.numel() for v in r["visible"].values())
        assert r["params"] < r["dense_params"]
