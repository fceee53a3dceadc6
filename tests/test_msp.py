"""MSP: the Fisher trace against squared gradients summed by hand, exact weighted mean for every individual of
every generation, reproducibility, the report's search record, gradients left as they were, and refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2, make_llama, random_batches

from mosaic_lightning import PruningConfig, prune_model
from mosaic_lightning.allocation import MSP, AllocationContext
from mosaic_lightning.allocation.msp import fisher_trace
from mosaic_lightning.core.adapters import ModelAdapter

LAYER_PARAMS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
GPT2_LAYER_PARAMS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # Conv1D, q/k/v fused in c_attn


@pytest.mark.parametrize(("build", "blocks", "paths"),
                         [(make_llama, lambda m: m.model.layers, LAYER_PARAMS),
                          (make_gpt2, lambda m: m.transformer.h, GPT2_LAYER_PARAMS)])  # fmt: skip
def test_fisher_trace_equals_squared_gradients_summed_by_hand(build, blocks, paths):
    model, batches = build(), random_batches(3)
    context = AllocationContext(model, ModelAdapter(model), batches, progress=False)
    got = fisher_trace(context, [0, 1], max_batches=3)
    expected = [0.0, 0.0]
    for ids in batches:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for layer in range(2):
            for path in paths:
                grad = blocks(model)[layer].get_submodule(path).weight.grad
                expected[layer] += float(grad.double().square().sum())
    assert got == pytest.approx(expected, rel=1e-6)
    assert expected[0] != pytest.approx(expected[1])
    model.requires_grad_(False)  # frozen weights (a LoRA base): the same trace, from activations alone
    assert fisher_trace(context, [0, 1], max_batches=3) == pytest.approx(expected, rel=1e-6)


def test_fisher_trace_in_passes_of_one_sequence_sums_each_sequence_squared_gradient():
    model, batches = make_llama(), random_batches(2, batch=3)
    context = AllocationContext(model, ModelAdapter(model), batches, progress=False)
    expected = [0.0, 0.0]
    for ids in batches:
        for sequence in ids:
            model.zero_grad()
            model(input_ids=sequence[None], labels=sequence[None]).loss.backward()
            for layer in range(2):
                for path in LAYER_PARAMS:
                    expected[layer] += float(model.model.layers[layer].get_submodule(path).weight.grad.double()
                                             .square().sum())  # fmt: skip
    assert fisher_trace(context, [0, 1], max_batches=2, sequences=1) == pytest.approx(expected, rel=1e-6)
    assert fisher_trace(context, [0, 1], max_batches=2) != pytest.approx(expected, rel=1e-3)  # per batch: another sum


def _run(seed: int = 0, sparsity: float = 0.6):
    model = make_llama()
    config = PruningConfig(sparsity, "wanda", MSP(population=5, generations=3, seed=seed), max_sparsity=0.9)
    return model, prune_model(model, random_batches(4), config, progress=False).report


def test_every_individual_of_every_generation_keeps_the_weighted_mean_exact():
    model, report = _run()
    sizes = torch.tensor([sum(model.model.layers[i].get_submodule(p).weight.numel() for p in LAYER_PARAMS)
                          for i in range(2)], dtype=torch.float64)  # fmt: skip
    population = report.allocation["population"]
    assert len(population) == 4 and all(len(g) == 5 for g in population)
    for generation in population:
        for individual in generation:
            values = torch.tensor(individual, dtype=torch.float64)
            assert float(values @ sizes / sizes.sum()) == pytest.approx(0.6, abs=1e-12)
            assert (values >= 0).all() and (values <= 0.9).all()
    assert len({tuple(i) for g in population for i in g}) > 2  # the search explores
    assert report.params_pruned == round(0.6 * report.params_targeted)  # and the final prune is exact


def test_search_is_reproducible_and_records_its_history():
    _, first = _run(seed=3)
    _, again = _run(seed=3)
    assert first.allocation["best"] == again.allocation["best"]
    assert first.allocation["history"] == again.allocation["history"]
    history = first.allocation["history"]
    assert [h["generation"] for h in history] == [0, 1, 2, 3]
    bests = [h["best"] for h in history]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:], strict=False))  # elitism: never worse
    assert first.allocation["best_fitness"] == bests[-1]
    layer_of = {p.key: p.layer for p in first.projections}
    for p in first.projections:  # the best individual is the allocation, per layer (then renormalised exactly)
        assert abs(p.requested_sparsity - first.allocation["best"][layer_of[p.key]]) < 2 / p.numel + 1e-9


def test_the_search_leaves_gradients_and_weights_as_they_were():
    model, batches = make_llama(), random_batches(4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    context = AllocationContext(model, ModelAdapter(model), batches, progress=False,
                                config=PruningConfig(0.5, "wanda", "msp"))  # fmt: skip
    MSP(population=3, generations=1).allocate(context, 0.5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert torch.equal(p.grad, torch.full_like(p, 0.5)), n


@pytest.mark.parametrize(("kwargs", "message"), [({"population": 1}, "msp population=1"),
                                                 ({"mutation_step": 0.0}, "msp mutation_step=0.0"),
                                                 ({"seed": -1}, "msp seed=-1"),
                                                 ({"fisher_sequences": 0}, "msp fisher_sequences=0")])  # fmt: skip
def test_bad_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MSP(**kwargs)


def test_nm_patterns_are_refused_before_any_weight_changes():
    with pytest.raises(ValueError, match="allocation='msp'.*cannot take|pattern='2:4'"):
        PruningConfig(0.5, "wanda", "msp", pattern="2:4")


def _llama_layers(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _kept_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros in every group of ``m`` consecutive inputs of every row."""
    return (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)


def test_mixed_nm_gives_each_layer_its_own_n_with_the_mean_exact():
    """``mixed:8`` at a 75% mean: every projection keeps the same N of every 8 in every group, one N per layer,
    the N values average to 2 (layers are equal), and every individual of the search is on that grid."""
    model = _llama_layers(4)
    msp = MSP(population=6, generations=3, max_spread=0.3, seed=1)
    report = prune_model(model, random_batches(4), PruningConfig(0.75, "wanda", msp, pattern="mixed:8"),
                         progress=False).report  # fmt: skip
    layer_n = []
    for layer in model.model.layers:
        kept = {path: _kept_per_group(layer.get_submodule(path).weight, 8) for path in LAYER_PARAMS}
        values = {int(k.unique().item()) for k in kept.values() if k.unique().numel() == 1}
        assert len(values) == 1 and all(k.unique().numel() == 1 for k in kept.values()), kept
        layer_n.append(values.pop())
    assert sum(layer_n) == 2 * 4 and all(1 <= n <= 7 for n in layer_n)
    assert report.params_pruned == round(0.75 * report.params_targeted)
    for generation in report.allocation["population"]:
        for individual in generation:
            steps = [s * 8 for s in individual]
            assert all(abs(s - round(s)) < 1e-9 for s in steps) and round(sum(steps)) == 6 * 4
    assert len({tuple(i) for g in report.allocation["population"] for i in g}) > 2  # the search explores


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_mixed_nm_under_uniform_allocation_is_plain_n_m(method):
    """Uniform at 75% over mixed:8 is 2:8 everywhere: the same weights as the fixed pattern."""
    batches = random_batches(3)
    mixed, fixed = make_llama(), make_llama()
    prune_model(mixed, batches, PruningConfig(0.75, method, "uniform", pattern="mixed:8"), progress=False)
    prune_model(fixed, batches, PruningConfig(0.75, method, "uniform", pattern="2:8"), progress=False)
    for (name, a), (_, b) in zip(mixed.named_parameters(), fixed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_mixed_nm_refusals_name_what_is_wrong():
    batches = random_batches(2)
    with pytest.raises(ValueError, match=r"not a whole number of 1/M steps"):
        prune_model(make_llama(), batches, PruningConfig(0.7, "wanda", "msp", pattern="mixed:8"), progress=False)
    unequal = PruningConfig(0.75, "wanda", "msp", pattern="mixed:8", exclude=["model.layers.0.mlp.down_proj"])
    with pytest.raises(ValueError, match="needs layers of equal size"):
        prune_model(make_llama(), batches, unequal, progress=False)
    with pytest.raises(ValueError, match="cannot be reached exactly in whole steps of 1/M"):
        prune_model(make_llama(), batches, PruningConfig(0.7, "wanda", "uniform", pattern="mixed:8"), progress=False)
