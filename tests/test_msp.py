"""MSP: the Fisher trace against squared gradients summed by hand, exact weighted mean for every individual of
every generation, reproducibility, the report's search record, gradients left as they were, and refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama, random_batches

from mosaic_lightning import PruningConfig, prune_model
from mosaic_lightning.adapters import ModelAdapter
from mosaic_lightning.allocation import MSP, AllocationContext
from mosaic_lightning.allocation.msp import fisher_trace

LAYER_PARAMS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def test_fisher_trace_equals_squared_gradients_summed_by_hand():
    model, batches = make_llama(), random_batches(3)
    context = AllocationContext(model, ModelAdapter(model), batches, progress=False)
    got = fisher_trace(context, [0, 1], max_batches=3)
    expected = [0.0, 0.0]
    for ids in batches:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for layer in range(2):
            for path in LAYER_PARAMS:
                grad = model.model.layers[layer].get_submodule(path).weight.grad
                expected[layer] += float(grad.double().square().sum())
    assert got == pytest.approx(expected, rel=1e-6)
    assert expected[0] != pytest.approx(expected[1])


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
                                                 ({"seed": -1}, "msp seed=-1")])  # fmt: skip
def test_bad_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MSP(**kwargs)


def test_nm_patterns_are_refused_before_any_weight_changes():
    with pytest.raises(ValueError, match="allocation='msp'.*cannot take|pattern='2:4'"):
        PruningConfig(0.5, "wanda", "msp", pattern="2:4")
