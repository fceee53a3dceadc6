"""StructPrune (methods/structprune.py) and its energy-softmax allocation (allocation/energy.py) on tiny models:
the closed-form mask against brute force, the exact total, compaction, the recipe through the CLI, bad input,
DDP. Every expected value is computed here from the model's weights and hooked activations."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TARGET_PARAMS, assert_state_unchanged, make_llama, random_batches, state_copy, write_text_files
from transformers import LlamaConfig, LlamaForCausalLM

from mosaic_lightning import PruningConfig, compact_model, load_pruned, prune_model
from mosaic_lightning.allocation import EnergySoftmax
from mosaic_lightning.core.structure import HEADS, MLP, UnitGroup
from mosaic_lightning.methods import StructPrune
from mosaic_lightning.methods.structprune import project, refit

ROOT = Path(__file__).resolve().parents[1]
INPUT = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def _micro_llama() -> LlamaForCausalLM:
    """One block small enough to enumerate: 6 MLP channels, 4 query heads of size 2 in 2 key/value groups."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=8, intermediate_size=6, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _inputs_of(model, modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every token's input to each module over the calibration batches, ``[N, in]``."""
    seen = {name: [] for name in modules}
    hooks = [m.register_forward_hook(lambda _m, a, _o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in modules.items()]  # fmt: skip
    with torch.no_grad():
        for batch in random_batches():
            model(input_ids=batch, use_cache=False)
    for hook in hooks:
        hook.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def _brute_force(weight, hessian, group: UnitGroup, num_remove: int) -> tuple[tuple[int, ...], float]:
    """The unit subset minimising ``tr((Z - W) D (Z - W)^T)``, ``D`` = ``H`` without cross-unit entries, over every
    subset with equal numbers per key/value group."""
    metric = torch.zeros_like(hessian)
    for i in range(hessian.shape[0]):
        for j in range(hessian.shape[1]):
            if i // group.size == j // group.size:
                metric[i, j] = hessian[i, j]
    per_group = group.count // group.groups
    best = None
    for subset in itertools.combinations(range(group.count), num_remove):
        if len({sum(1 for u in subset if u // per_group == g) for g in range(group.groups)}) > 1:
            continue
        z = weight.clone()
        for unit in subset:
            z[:, unit * group.size : (unit + 1) * group.size] = 0
        distance = float(torch.trace((z - weight) @ metric @ (z - weight).t()))
        if best is None or distance < best[1]:
            best = (subset, distance)
    return best


@pytest.mark.parametrize(("kind", "num_remove"), [(MLP, 1), (MLP, 2), (MLP, 3), (HEADS, 2)])
def test_closed_form_mask_equals_brute_force_over_unit_subsets(kind, num_remove):
    model = _micro_llama()
    layer = model.model.layers[0]
    consumer = layer.mlp.down_proj if kind == MLP else layer.self_attn.o_proj
    tokens = _inputs_of(model, {"c": consumer})["c"]
    hessian = tokens.t() @ tokens / tokens.shape[0]
    weight = consumer.weight.detach().double()
    group = (UnitGroup(MLP, 0, 6, 1, ("gate", "up"), ("down",)) if kind == MLP
             else UnitGroup(HEADS, 0, 4, 2, ("q",), ("o",), groups=2))  # fmt: skip
    z, removed = project(weight, _unit_blocks_by_hand(hessian, group.size), group, num_remove)
    subset, _ = _brute_force(weight, hessian, group, num_remove)
    assert tuple(removed) == subset
    expected = weight.clone()
    for unit in subset:
        expected[:, unit * group.size : (unit + 1) * group.size] = 0
    torch.testing.assert_close(z, expected, rtol=0, atol=0)


def _unit_blocks_by_hand(hessian, size):
    blocks = torch.zeros_like(hessian)
    for start in range(0, hessian.shape[0], size):
        blocks[start : start + size, start : start + size] = hessian[start : start + size, start : start + size]
    return blocks


def test_refit_is_the_least_squares_solution_on_the_kept_columns():
    model = _micro_llama()
    down = model.model.layers[0].mlp.down_proj
    p = _inputs_of(model, {"down": down})["down"]
    weight = down.weight.detach().double()
    kept = torch.tensor([0, 2, 3, 5])
    solved = refit(weight, p.t() @ p / p.shape[0], kept)
    expected = torch.linalg.lstsq(p[:, kept], p @ weight.t()).solution.t()  # min ||P_K W_K^T - P W^T||
    torch.testing.assert_close(solved[:, kept], expected, rtol=1e-6, atol=1e-8)
    assert not solved[:, [1, 4]].any()


def test_structprune_reconstructs_the_mlp_better_than_removing_the_same_channels_without_refit():
    """The refit of down is what the coordinated objective buys: on the same channels, the block's MLP output
    is closer to the dense one than with the dense weights and those channels zeroed."""
    dense = make_llama()
    model = make_llama()
    config = PruningConfig(0.3, "structprune", "energy", structured_fraction=1.0, structured_units=["mlp"])
    outcome = prune_model(model, random_batches(), config, progress=False)
    mlp, dense_mlp = model.model.layers[0].mlp, dense.model.layers[0].mlp
    x = _inputs_of(dense, {"x": dense_mlp})["x"].float()
    removed = outcome.structure["0.mlp"]
    zeroed = make_llama().model.layers[0].mlp
    with torch.no_grad():
        zeroed.down_proj.weight[:, removed] = 0
        target = dense_mlp(x)
        assert (mlp(x) - target).square().sum() < 0.9 * (zeroed(x) - target).square().sum()


def _energies_by_hand(model, group_kinds) -> dict[str, float]:
    """``E_g``: mean over units of ``sum_j ||W_:,j||^2 ||X_j||^2`` over the residual stream's energy, then over
    the mean of its kind (hooks on the dense model; the stream is each decoder layer's hidden-state input)."""
    raw = {}
    for i, layer in enumerate(model.model.layers):
        consumers = {MLP: layer.mlp.down_proj, HEADS: layer.self_attn.o_proj}
        streams = []
        hook = layer.register_forward_pre_hook(
            lambda _m, a, k, s=streams: s.append(a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        seen = _inputs_of(model, {kind: consumers[kind] for kind in group_kinds})
        hook.remove()
        stream = sum(float(h.double().square().sum()) for h in streams)
        for kind in group_kinds:
            columns = consumers[kind].weight.detach().double().square().sum(0) * seen[kind].square().sum(0)
            units = 1 if kind == MLP else model.config.hidden_size // model.config.num_attention_heads
            raw[f"{i}.{kind}"] = float(columns.sum()) / (columns.numel() // units) / stream
    means = {kind: sum(v for k, v in raw.items() if k.endswith(kind)) / len(model.model.layers) for kind in group_kinds}
    return {k: v / means[k.split(".")[1]] for k, v in raw.items()}


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_energy_softmax_removes_exactly_the_target_number_of_parameters(sparsity):
    model = make_llama()
    reference = make_llama()
    temperature = 0.5
    config = PruningConfig(sparsity, "structprune", EnergySoftmax(temperature=temperature), structured_fraction=1.0)
    outcome = prune_model(model, random_batches(), config, progress=False)
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in TARGET_PARAMS["llama"])
    zeros = sum(int((params[n] == 0).sum()) for n in TARGET_PARAMS["llama"])
    assert outcome.report.params_pruned == round(sparsity * total) and zeros >= round(sparsity * total)
    hidden, head_dim = 64, 16
    per_unit = {MLP: 3 * hidden, HEADS: 2 * head_dim * hidden}  # gate+up rows and a down column; q rows + o cols
    counts = {MLP: 128, HEADS: 4}
    structural = sum(len(units) * per_unit[key.split(".")[1]] for key, units in outcome.structure.items())
    assert structural == outcome.report.structured_params_removed
    assert 0 <= round(sparsity * total) - structural < per_unit[MLP]  # whole units: short by less than a channel

    details = outcome.report.allocation
    energies = _energies_by_hand(reference, [MLP, HEADS])
    assert details["energy"] == pytest.approx(energies, rel=1e-4)
    ratios = details["ratio"]
    continuous = sum(r * counts[k.split(".")[1]] * per_unit[k.split(".")[1]] for k, r in ratios.items())
    assert continuous == pytest.approx(round(sparsity * total), rel=1e-6)
    caps = {MLP: 115 / 128, HEADS: 2 / 4}  # max_ratio 0.9 of 128 channels; one head per kv group stays
    free = [k for k, r in ratios.items() if r < caps[k.split(".")[1]] - 1e-9]
    assert len(free) >= 2
    for a, b in itertools.combinations(free, 2):  # softmax: ratios differ by exp(-(E_a - E_b) / T)
        assert ratios[a] / ratios[b] == pytest.approx(math.exp(-(energies[a] - energies[b]) / temperature), rel=1e-4)


def test_compacted_structprune_model_gives_the_masked_models_logits():
    model = make_llama()
    outcome = prune_model(model, random_batches(), PruningConfig(0.4, "structprune", "energy", structured_fraction=1.0),
                          progress=False)  # fmt: skip
    with torch.no_grad():
        masked = model(input_ids=INPUT).logits
        before = sum(p.numel() for p in model.parameters())
        compact_model(model, outcome.structure)
        compacted = model(input_ids=INPUT).logits
    torch.testing.assert_close(compacted, masked, rtol=1e-5, atol=1e-5)
    assert before - sum(p.numel() for p in model.parameters()) == outcome.report.structured_params_removed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"structured_fraction": 0.0}, "structured_fraction=0.0"),
        ({"structured_fraction": 1.0, "uniform_structure": True}, "uniform_structure=True"),
        ({"sparsity": 0.95, "structured_fraction": 1.0}, "cannot remove"),
    ],
)
def test_energy_allocation_refuses_bad_settings_before_any_work(kwargs, message):
    model = make_llama()
    before = state_copy(model)
    config = PruningConfig(**{"sparsity": 0.3, "method": "structprune", "allocation": "energy", **kwargs})
    with pytest.raises(ValueError, match=message):
        prune_model(model, random_batches(), config, progress=False)
    assert_state_unchanged(model, before)


def test_structprune_without_units_is_refused_with_the_model_unchanged():
    model = make_llama()
    before = state_copy(model)
    with pytest.raises(ValueError, match="structured_fraction > 0"):
        prune_model(model, random_batches(), PruningConfig(0.3, "structprune", "uniform"), progress=False)
    assert_state_unchanged(model, before)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StructPrune(iterations=0), "iterations=0"),
        (lambda: StructPrune(rho=-1.0), "rho=-1.0"),
        (lambda: StructPrune(growth=0.5), "growth=0.5"),
        (lambda: EnergySoftmax(temperature=0), "temperature=0"),
        (lambda: EnergySoftmax(max_ratio=1.0), "max_ratio=1.0"),
    ],
)
def test_bad_options_name_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("overrides", "sparsity", "allocation"),
    [
        ([], 0.3, "EnergySoftmax"),
        (["--pruning.sparsity", "0.4", "--pruning.allocation", "uniform"], 0.4, "uniform"),
    ],
)
def test_structprune_recipe_runs_through_the_cli_and_exports_a_smaller_model(tmp_path, tiny_model_dir, overrides,
                                                                             sparsity, allocation):  # fmt: skip
    train, test = write_text_files(tmp_path)
    export = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "recipes/structprune-30.yaml"),
         "--model.pretrained", str(tiny_model_dir), "--data.train_files", str(train), "--data.eval_files", str(test),
         "--data.seq_len", "32", "--data.num_calibration_samples", "8", "--data.max_eval_windows", "2",
         "--trainer.logger", "false", "--export_dir", str(export), *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "pruning_report.json").read_text())
    assert report["params_pruned"] == round(sparsity * report["params_targeted"])
    assert all(p["achieved_sparsity"] == p["requested_sparsity"] for p in report["projections"])
    assert "StructPrune" in json.dumps(report["config"]["method"])
    assert allocation in json.dumps(report["config"]["allocation"])
    assert report["calibration"]["batches"] == 2  # 8 samples in batches of 4
    dense = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    pruned = load_pruned(export)
    sizes = [sum(p.numel() for n, p in m.named_parameters() if n.endswith("_proj.weight")) for m in (dense, pruned)]
    assert sizes[0] - sizes[1] == report["structured_params_removed"]
    assert sizes[0] - sizes[1] >= (sparsity - 0.05) * report["params_targeted"]  # physically gone


def test_ddp_structprune_units_identical_on_ranks(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).parent / "distributed" / "ddp_prune.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "structprune", "energy", "1.0"], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["structure"] == ranks[1]["structure"] and any(ranks[0]["structure"].values())
    assert ranks[0]["allocation"]["energy"] == ranks[1]["allocation"]["energy"]
    for name, keep in ranks[0]["masks"].items():
        assert torch.equal(ranks[1]["masks"][name], keep), name
        assert not ranks[0]["weights"][name][~keep].any(), f"{name}: removed units regrew after DDP steps"
    sys.path.insert(0, str(script.parent))  # one process on the union of both ranks' batches: the same units
    from ddp_prune import calibration

    config = PruningConfig(0.5, "structprune", "energy", structured_fraction=1.0)
    single = prune_model(make_llama(), calibration(), config, progress=False)
    assert single.structure == ranks[0]["structure"]
    assert single.report.allocation["energy"] == pytest.approx(ranks[0]["allocation"]["energy"], rel=1e-5)


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("sparsity", [0.3, 0.4, 0.5])
def test_the_owl_rule_unit_planner_never_plans_more_than_a_structured_only_target(sparsity, uniform):
    """Rounding every group's channel count to the nearest could overshoot ``structured_fraction=1`` (refused as
    "more than sparsity"); the planner now trims roundings up, and single weights fill the rest exactly."""
    model = make_llama()
    config = PruningConfig(sparsity, "wanda", "uniform", structured_fraction=1.0, uniform_structure=uniform)
    outcome = prune_model(model, random_batches(), config, progress=False)
    total = sum(dict(model.named_parameters())[n].numel() for n in TARGET_PARAMS["llama"])
    assert outcome.report.params_pruned == round(sparsity * total)
    assert 0 <= round(sparsity * total) - outcome.report.structured_params_removed < 2 * 3 * 64  # a channel a layer
    if uniform:
        assert len(outcome.structure["0.mlp"]) == len(outcome.structure["1.mlp"])
