"""The pruning engine end to end on tiny Llama / GPT-2 / OPT: exact sparsity, reports, validation before any
weight changes, layer streaming and sequential (pruned-input) calibration."""

from __future__ import annotations

import tempfile

import pytest
import torch
from conftest import (
    BUILDERS,
    LLAMA_PROJECTIONS,
    TARGET_PARAMS,
    assert_state_unchanged,
    make_gpt2,
    make_llama,
    random_batches,
    state_copy,
)

from mosaic_lightning import PruningConfig, prune_model
from mosaic_lightning.allocation import OWL, Mosaic
from mosaic_lightning.calibration.capture import capture_block_inputs
from mosaic_lightning.calibration.stats import NonFiniteActivationError
from mosaic_lightning.methods import Magnitude

METHODS = ["magnitude", "wanda", "sparsegpt"]
ALLOCATIONS = ["uniform", "owl", "mosaic"]
PROJECTIONS = {
    "llama": ["q", "k", "v", "o", "gate", "up", "down"],
    "gpt2": ["q", "k", "v", "o", "up", "down"],
    "opt": ["q", "k", "v", "o", "up", "down"],
}


def _out_in(model, arch: str, name: str) -> torch.Tensor:
    """A targeted weight in [out, in] orientation (GPT-2's Conv1D stores [in, out])."""
    w = model.get_parameter(name).detach()
    return w.t() if arch == "gpt2" else w


def _zeros(model, arch: str) -> tuple[int, int]:
    params = [model.get_parameter(n) for n in TARGET_PARAMS[arch]]
    return sum(int((p == 0).sum()) for p in params), sum(p.numel() for p in params)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_unstructured_sparsity_is_exact(arch, method, allocation, calib_batches):
    model = BUILDERS[arch]()
    assert _zeros(model, arch)[0] == 0
    sparsity = 0.5 if method != "wanda" else 0.37
    config = PruningConfig(sparsity=sparsity, method=method, allocation=allocation)
    outcome = prune_model(model, calib_batches, config, progress=False)

    zeros, total = _zeros(model, arch)
    assert abs(zeros / total - sparsity) <= 1e-3
    assert zeros == round(sparsity * total)  # exact counts, not just within tolerance

    report = outcome.report
    expected_keys = {f"{layer}.{name}" for layer in range(2) for name in PROJECTIONS[arch]}
    assert {p.key for p in report.projections} == expected_keys
    assert len(report.projections) == len(expected_keys)
    assert report.params_targeted == total
    assert report.achieved_sparsity == pytest.approx(zeros / total, abs=1e-12)
    # Magnitude needs no forward pass for the pruning sweep itself.
    assert report.calibration == {"batches": 2, "tokens": 0 if method == "magnitude" else 64}
    for p in report.projections:
        assert 0 < p.achieved_sparsity < 1
        assert p.achieved_sparsity == pytest.approx(p.requested_sparsity, abs=1e-12)
        assert (p.outlier_ratio is None) == (allocation == "uniform")

    # The mask store covers exactly the targeted parameters and agrees with the zeros in the model.
    assert set(outcome.masks.masks) == set(TARGET_PARAMS[arch])
    for name in TARGET_PARAMS[arch]:
        keep = outcome.masks.masks[name]
        weight = model.get_parameter(name)
        assert keep.shape == weight.shape
        assert (weight[~keep] == 0).all() and (weight[keep] != 0).all()

    requested = {p.key: p.requested_sparsity for p in report.projections}
    if allocation == "uniform":
        assert all(abs(s - sparsity) < 1e-3 for s in requested.values())
    elif allocation == "owl":  # one value per layer (up to the rounding of single weights)
        for layer in range(2):
            values = [requested[f"{layer}.{n}"] for n in PROJECTIONS[arch]]
            assert max(values) - min(values) < 2 / 2048
        assert abs(requested["0.q"] - requested["1.q"]) > 1e-3
    else:  # mosaic: s - A_l + mean_l(B_t): a layer term plus a type term, so layers differ by the same amount
        differences = [requested[f"0.{n}"] - requested[f"1.{n}"] for n in PROJECTIONS[arch]]  # for every type
        assert max(differences) - min(differences) < 4 / 2048


@pytest.mark.parametrize("method", METHODS)
def test_two_four_pattern_is_exact(arch, method, calib_batches):
    model = BUILDERS[arch]()
    config = PruningConfig(sparsity=0.5, method=method, allocation="uniform", pattern="2:4")
    outcome = prune_model(model, calib_batches, config, progress=False)
    zeros, total = _zeros(model, arch)
    assert zeros == total // 2
    for name in TARGET_PARAMS[arch]:
        w = _out_in(model, arch, name)
        per_group = (w == 0).reshape(w.shape[0], -1, 4).sum(dim=-1)
        assert (per_group == 2).all(), name
    assert all(p.achieved_sparsity == 0.5 for p in outcome.report.projections)


def test_targets_leave_other_projections_untouched(calib_batches):
    model = make_llama()
    before = state_copy(model)
    config = PruningConfig(
        sparsity=0.5, method="sparsegpt", allocation="owl", exclude=["down", r"model\.layers\.1\..*"]
    )
    outcome = prune_model(model, calib_batches, config, progress=False)
    pruned = {f"model.layers.0.{p}.weight" for p in LLAMA_PROJECTIONS if p != "mlp.down_proj"}
    assert set(outcome.masks.masks) == pruned
    after = model.state_dict()
    for name, value in before.items():
        if name in pruned:
            assert (after[name] == 0).float().mean() == pytest.approx(0.5)
        else:
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    assert {p.key for p in outcome.report.projections} == {f"0.{n}" for n in ("q", "k", "v", "o", "gate", "up")}


def test_unstructured_layer_pattern_and_training_mode_restored(calib_batches):
    model = make_llama().train()
    outcome = prune_model(
        model, calib_batches, PruningConfig(sparsity=0.6, pattern="unstructured-layer"), progress=False
    )
    assert model.training
    zeros, total = _zeros(model, "llama")
    assert zeros == round(0.6 * total)
    # Layer scope: rows of one projection end up with different counts.
    keep = outcome.masks.masks["model.layers.0.mlp.down_proj.weight"]
    assert len(set((~keep).sum(dim=1).tolist())) > 1


@pytest.mark.parametrize("method", METHODS)
def test_unstructured_layer_pattern_on_gpt2(method, calib_batches):
    model = make_gpt2()
    prune_model(
        model, calib_batches, PruningConfig(sparsity=0.6, method=method, pattern="unstructured-layer"), progress=False
    )
    zeros, total = _zeros(model, "gpt2")
    assert zeros == round(0.6 * total)


# -- validation: errors come before any weight changes ----------------------------------------------------------
def _run(model, batches, **config):
    return prune_model(model, batches, PruningConfig(**config), progress=False)


BAD_INPUTS = [
    pytest.param({"sparsity": 1.0}, ValueError, r"sparsity=1\.0", id="sparsity-1"),
    pytest.param({"sparsity": -0.1}, ValueError, r"sparsity=-0\.1", id="sparsity-negative"),
    pytest.param({"sparsity": "0.5"}, TypeError, "sparsity", id="sparsity-str"),
    pytest.param({"method": "obd"}, ValueError, r"method='obd'.*magnitude", id="unknown-method"),
    pytest.param({"allocation": "owls"}, ValueError, r"allocation='owls'.*mosaic", id="unknown-allocation"),
    pytest.param({"pattern": "2-4"}, ValueError, r"pattern='2-4'", id="unknown-pattern"),
    pytest.param({"sparsity": 1 / 3, "pattern": "2:3"}, ValueError, r"M=3 does not divide.*64", id="nm-width"),
    pytest.param({"sparsity": 0.6, "pattern": "2:4"}, ValueError, r"fixes sparsity at 0\.5", id="nm-sparsity"),
    pytest.param({"allocation": "owl", "pattern": "2:4"}, ValueError, "allocation='owl'", id="nm-owl"),
    pytest.param({"targets": ["qkv_proj"]}, ValueError, r"targets item 'qkv_proj'", id="bad-target"),
    pytest.param({"allocation": "mosaic", "min_sparsity": 0.6}, ValueError, "min_sparsity=0.6", id="min-above-target"),
    pytest.param({"allocation": "owl", "max_sparsity": 0.4}, ValueError, "max_sparsity=0.4", id="max-below-target"),
]


@pytest.mark.parametrize(("config", "error", "match"), BAD_INPUTS)
def test_bad_inputs_raise_before_any_weight_changes(config, error, match, calib_batches):
    model = make_llama()
    before = state_copy(model)
    with pytest.raises(error, match=match):
        _run(model, calib_batches, **{"sparsity": 0.5, **config})
    assert_state_unchanged(model, before)


def test_sparsity_bounds_apply_to_non_uniform_allocations_only(calib_batches):
    model = make_llama()
    before = state_copy(model)
    with pytest.raises(ValueError, match="min_sparsity"):
        _run(model, calib_batches, sparsity=0.3, allocation="mosaic", min_sparsity=0.5, max_sparsity=0.9)
    assert_state_unchanged(model, before)
    # Uniform allocation gives every projection the target, so the bounds do not apply.
    _run(model, calib_batches, sparsity=0.3, allocation="uniform", min_sparsity=0.5, max_sparsity=0.9)
    zeros, total = _zeros(model, "llama")
    assert zeros == round(0.3 * total)


@pytest.mark.parametrize("arch_name", ["llama", "opt"])
def test_empty_calibration_set_raises_unchanged(arch_name):
    model = BUILDERS[arch_name]()
    before = state_copy(model)
    with pytest.raises(ValueError, match="calibration set is empty"):
        _run(model, [], sparsity=0.5)
    with pytest.raises(ValueError, match="calibration set is empty"):
        _run(model, iter(()), sparsity=0.5, allocation="owl")
    assert_state_unchanged(model, before)


@pytest.mark.parametrize(
    ("method", "allocation"), [("wanda", "uniform"), ("sparsegpt", "uniform"), ("wanda", "mosaic")]
)
def test_nan_activations_in_block_one_raise_with_model_unchanged(method, allocation, calib_batches, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where block 0's pending new weights were held
    model = make_llama()
    with torch.no_grad():  # a non-targeted weight of block 1: its projections' inputs become NaN there
        model.model.layers[1].input_layernorm.weight[0] = float("nan")
    before = state_copy(model)
    with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.1\.") as info:
        _run(model, calib_batches, sparsity=0.5, method=method, allocation=allocation)
    assert "no weight was changed" in str(info.value)
    assert_state_unchanged(model, before)  # block 0 was processed, but nothing was committed
    assert _zeros(model, "llama")[0] == 0
    assert list(tmp_path.iterdir()) == []  # and the folder holding its pending weights is gone


def test_sparsegpt_leaves_no_files_behind(calib_batches, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = make_llama()
    _run(model, calib_batches, sparsity=0.5, method="sparsegpt")
    assert _zeros(model, "llama")[0] > 0
    assert list(tmp_path.iterdir()) == []


def test_non_finite_embeddings_raise(calib_batches):
    model = make_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[int(calib_batches[0][0, 0])] = float("inf")
    before = state_copy(model)
    with pytest.raises(NonFiniteActivationError, match="embeddings"):
        _run(model, calib_batches, sparsity=0.5)
    assert_state_unchanged(model, before)


# -- layer streaming --------------------------------------------------------------------------------------------
def test_capture_block_inputs_keeps_only_first_block_hidden_states(llama, calib_batches):
    inputs = capture_block_inputs(llama, llama.model.layers, calib_batches)
    assert len(inputs.hidden) == len(calib_batches) == len(inputs.args) == len(inputs.kwargs)
    for h, ids in zip(inputs.hidden, calib_batches, strict=True):
        assert tuple(h.shape) == (2, 16, 64)
        torch.testing.assert_close(h, llama.model.embed_tokens(ids))  # Llama's first block sees the embeddings
    assert inputs.tokens == 64


def test_gpt2_capture_includes_position_embeddings(gpt2, calib_batches):
    inputs = capture_block_inputs(gpt2, gpt2.transformer.h, calib_batches)
    positions = torch.arange(16)
    for h, ids in zip(inputs.hidden, calib_batches, strict=True):
        torch.testing.assert_close(h, gpt2.transformer.wte(ids) + gpt2.transformer.wpe(positions))


def test_pruning_streams_blocks_and_never_runs_the_head():
    model = make_llama()
    batches = random_batches(num=3)
    calls: dict[str, list[tuple[int, ...]]] = {"block0": [], "block1": [], "norm": [], "lm_head": []}

    def recorder(key):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            calls[key].append(tuple(hidden.shape))

        return hook

    modules = {
        "block0": model.model.layers[0],
        "block1": model.model.layers[1],
        "norm": model.model.norm,
        "lm_head": model.lm_head,
    }
    handles = [m.register_forward_pre_hook(recorder(k), with_kwargs=True) for k, m in modules.items()]
    try:
        prune_model(model, batches, PruningConfig(sparsity=0.5, method="wanda"), progress=False)
    finally:
        for h in handles:
            h.remove()
    assert calls["norm"] == [] and calls["lm_head"] == []  # never a full-model forward
    for key in ("block0", "block1"):
        assert len(calls[key]) >= len(batches)
        assert len(calls[key]) % len(batches) == 0
        assert set(calls[key]) == {(2, 16, 64)}


@torch.no_grad()
def _block_inputs(model, block: torch.nn.Module, batches) -> list[torch.Tensor]:
    """The hidden states entering ``block`` in plain forward passes of ``model`` over ``batches``."""
    seen: list[torch.Tensor] = []
    probe = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    for ids in batches:
        model(input_ids=ids, use_cache=False)
    probe.remove()
    return seen


@pytest.mark.parametrize("builder", [make_gpt2, make_llama])
def test_block_one_is_calibrated_on_pruned_block_zero_output(builder, calib_batches):
    """Sequential mode: the inputs block 1 is calibrated on equal the ones the final pruned model feeds it."""
    model = builder()
    block1 = model.model.layers[1] if hasattr(model, "model") else model.transformer.h[1]
    seen_while_pruning: list[torch.Tensor] = []
    handle = block1.register_forward_pre_hook(lambda _m, args: seen_while_pruning.append(args[0].clone()))
    dense_inputs = _block_inputs(model, block1, calib_batches)
    seen_while_pruning.clear()

    prune_model(model, calib_batches, PruningConfig(sparsity=0.5, method="sparsegpt"), progress=False)
    handle.remove()

    pruned_inputs = _block_inputs(model, block1, calib_batches)

    for i, expected in enumerate(pruned_inputs):
        torch.testing.assert_close(seen_while_pruning[i], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(dense_inputs[i], expected, atol=1e-4)  # pruning block 0 did change them


# -- outlier profile against an independent computation ----------------------------------------------------------
_LLAMA_PROJ = dict(zip(PROJECTIONS["llama"], LLAMA_PROJECTIONS, strict=True))  # short name -> module path


@torch.no_grad()
def _dense_wanda_scores(model, batches) -> dict[str, torch.Tensor]:
    """|W| * ||X_j|| of every projection from plain forward passes of the dense model, by key ``layer.name``."""
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for layer in range(2):
        for short, path in _LLAMA_PROJ.items():
            key = f"{layer}.{short}"

            def hook(_m, args, key=key):
                x = args[0].double().reshape(-1, args[0].shape[-1])
                sq[key] = sq.get(key, 0) + (x * x).sum(dim=0)

            handles.append(model.model.layers[layer].get_submodule(path).register_forward_pre_hook(hook))
    for ids in batches:
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {
        key: model.model.layers[int(key[0])].get_submodule(_LLAMA_PROJ[key[2:]]).weight.abs().double()
        * sq[key].sqrt()[None, :]
        for key in sq
    }


def _ratio(scores: list[torch.Tensor], threshold: float) -> float:
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > threshold * flat.mean()).sum()) / flat.numel()


def _check_profile(method: str, calib_batches) -> None:
    threshold = 3.0
    scores = _dense_wanda_scores(make_llama(), calib_batches)
    for allocation in ("mosaic", "owl"):
        allocation_class = {"mosaic": Mosaic, "owl": OWL}[allocation]
        config = PruningConfig(sparsity=0.5, method=method, allocation=allocation_class(threshold=threshold))
        report = prune_model(make_llama(), calib_batches, config, progress=False).report
        got = {p.key: p.outlier_ratio for p in report.projections}
        for key in scores:
            if allocation == "mosaic":
                expected = _ratio([scores[key]], threshold)
            else:
                expected = _ratio([s for k, s in scores.items() if k[0] == key[0]], threshold)
            assert got[key] == pytest.approx(expected, abs=1e-9), (allocation, key)
        assert len(set(got.values())) > 1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_outlier_profile_matches_direct_wanda_computation(method, calib_batches):
    _check_profile(method, calib_batches)


def test_magnitude_outlier_profile_uses_wanda_scores(calib_batches):
    _check_profile("magnitude", calib_batches)


# -- composite pruning (whole units, then single weights) ------------------------------------------------------
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_composite_pruning_removes_whole_units_and_stays_exact(method, calib_batches):
    model = make_llama()
    config = PruningConfig(sparsity=0.5, method=method, structured_fraction=0.5)
    outcome = prune_model(model, calib_batches, config, progress=False)

    zeros, total = _zeros(model, "llama")
    assert zeros == round(0.5 * total)
    removed_params = 0
    for layer in range(2):
        block = model.model.layers[layer]
        channels = outcome.structure[f"{layer}.mlp"]
        heads = outcome.structure[f"{layer}.heads"]
        for c in channels:  # an MLP channel: row of gate and up, column of down
            assert (block.mlp.gate_proj.weight[c] == 0).all() and (block.mlp.up_proj.weight[c] == 0).all()
            assert (block.mlp.down_proj.weight[:, c] == 0).all()
        for h in heads:  # a query head: head_dim rows of q, columns of o
            span = slice(16 * h, 16 * (h + 1))
            assert (block.self_attn.q_proj.weight[span] == 0).all()
            assert (block.self_attn.o_proj.weight[:, span] == 0).all()
        # GQA: 4 query heads share 2 key/value heads, so removals are equal per group (heads 0-1, heads 2-3).
        assert sum(h < 2 for h in heads) == sum(h >= 2 for h in heads)
        assert all(0 <= c < 128 for c in channels) and len(set(channels)) == len(channels)
        removed_params += len(channels) * 3 * 64 + len(heads) * 2 * 16 * 64
    assert removed_params > 0
    assert outcome.report.structured_params_removed == removed_params
    assert abs(removed_params - 0.25 * total) < 2 * 16 * 64  # about half of the pruned weights, to a head


def test_non_sequential_wanda_uses_dense_activations(calib_batches):
    """sequential=False: every block is scored on the dense model's activations (one forward, no re-runs)."""
    from conftest import make_llama

    reference_model = make_llama()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n, m in reference_model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    with torch.no_grad():
        for ids in calib_batches:
            reference_model(input_ids=ids)
    for h in hooks:
        h.remove()
    model = make_llama()
    config = PruningConfig(0.5, "wanda", "uniform", sequential=False)
    outcome = prune_model(model, calib_batches, config, progress=False)
    for name, inputs in seen.items():
        weight = dict(reference_model.named_modules())[name].weight
        norms = torch.cat(inputs).double().pow(2).sum(0).sqrt().float()
        order = torch.sort(weight.abs() * norms[None, :], dim=1, stable=True).indices[:, : weight.shape[1] // 2]
        expected = torch.ones_like(weight, dtype=torch.bool).scatter_(1, order, False)
        assert torch.equal(outcome.masks.masks[f"{name}.weight"], expected), name


class _InputRecorder(Magnitude):
    """Magnitude pruning that records the hidden states every block was calibrated on."""

    def __init__(self) -> None:
        self.seen: dict[int, list[torch.Tensor]] = {}

    def prune_block(self, block):
        self.seen[block.layer] = [h.clone() for h in block.inputs.hidden]
        return super().prune_block(block)


def test_every_block_gets_its_own_mask_and_rotary_embeddings_gemma3():
    """Gemma 3 passes sliding-window masks and local rotary embeddings to some layers, global ones to others:
    with sparsity 0, every block's calibration inputs equal the dense model's own hidden states there."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, rope_local_base_freq=10.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    batches = random_batches(num=2)
    recorder = _InputRecorder()
    prune_model(model, batches, PruningConfig(sparsity=0.0, method=recorder, allocation="uniform"), progress=False)
    with torch.no_grad():
        expected = [model(input_ids=ids, output_hidden_states=True).hidden_states for ids in batches]
    for layer in range(4):
        for batch, hidden in enumerate(recorder.seen[layer]):
            torch.testing.assert_close(hidden, expected[batch][layer], msg=f"block {layer}, batch {batch}")
