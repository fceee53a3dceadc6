"""True-sequential pruning (``true_sequential=True``): every projection calibrated with the projections before it
already pruned, in about one pass per block.

The reference here is written from scratch: for each projection in execution order it runs the *whole model*
(plain HF forward, weights as pruned so far) over the calibration batches to collect that projection's inputs,
then prunes it. No staging, no caches, no library calibration code.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, TARGET_PARAMS, random_batches
from torch.utils.flop_counter import FlopCounterMode

from mosaic_lightning import PruningConfig, prune_model
from mosaic_lightning.core.patterns import parse_pattern
from mosaic_lightning.methods.sparsegpt import sparsegpt_prune

SPARSITY = 0.5


def _module_of(model, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0])


def _as_out_in(module) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out]); a view, so writes reach the model."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def _inputs_of(model, module, batches) -> list[torch.Tensor]:
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen


def _reference(arch: str, batches, method: str) -> dict[str, torch.Tensor]:
    model = BUILDERS[arch]()
    for name in TARGET_PARAMS[arch]:  # execution order within each layer, layer by layer
        module = _module_of(model, name)
        xs = _inputs_of(model, module, batches)
        weight = _as_out_in(module)
        with torch.no_grad():
            if method == "wanda":
                norms = torch.cat(xs).double().pow(2).sum(0).sqrt().float()
                scores = weight.abs() * norms[None, :]
                drop = scores.argsort(dim=1)[:, : int(weight.shape[1] * SPARSITY)]
                weight.scatter_(1, drop, 0.0)
            else:
                hessian = sum(x.float().t() @ x.float() for x in xs) / sum(x.shape[0] for x in xs)
                count = int(weight.numel() * SPARSITY)
                result = sparsegpt_prune(weight, hessian, parse_pattern("unstructured"), count, 128, 0.01)
                weight.copy_(result.weight)
    return {name: model.get_parameter(name).detach().clone() for name in TARGET_PARAMS[arch]}


def _pruned(arch: str, batches, method: str, true_sequential: bool = True, attention: str = "sdpa"):
    model = BUILDERS[arch]()
    model.set_attn_implementation(attention)
    config = PruningConfig(sparsity=SPARSITY, method=method, true_sequential=true_sequential)
    prune_model(model, batches, config, progress=False)
    return model


@pytest.mark.parametrize(("arch", "attention"), [(a, "sdpa") for a in sorted(BUILDERS)] + [("llama", "eager")])
def test_wanda_true_sequential_equals_the_whole_model_reference(arch, attention):
    """Also with eager attention, whose attention module returns its weights beside its output (cached too)."""
    batches = random_batches(num=3)
    expected = _reference(arch, batches, "wanda")
    model = _pruned(arch, batches, "wanda", attention=attention)
    for name, value in expected.items():
        assert torch.equal(model.get_parameter(name) == 0, value == 0), name
        assert torch.equal(model.get_parameter(name), value), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsegpt_true_sequential_equals_the_whole_model_reference(arch):
    batches = random_batches(num=3)
    expected = _reference(arch, batches, "sparsegpt")
    model = _pruned(arch, batches, "sparsegpt")
    for name, value in expected.items():
        got = model.get_parameter(name)
        assert torch.equal(got == 0, value == 0), name
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, msg=name)


def test_true_sequential_differs_from_the_default_order():
    """The two orders are different calibrations (else the equality tests above would prove nothing new)."""
    batches = random_batches(num=3)
    a, b = _pruned("llama", batches, "wanda", True), _pruned("llama", batches, "wanda", False)
    names = TARGET_PARAMS["llama"]
    assert any(not torch.equal(a.get_parameter(n) == 0, b.get_parameter(n) == 0) for n in names)


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_true_sequential_runs_no_projection_twice(arch):
    """Counted FLOPs (the projections' matmuls; the CPU's fused attention is not counted): the staged passes
    together cost no more than one forward pass of the decoder stack (the last block's output is never needed,
    so a little less), where the default order runs every block but the last twice."""
    batches = random_batches(num=4, batch=2, seq_len=32)
    base = BUILDERS[arch]().base_model

    def forward():
        with torch.no_grad():
            for ids in batches:
                base(input_ids=ids, use_cache=False)

    one_pass = _flops(forward)
    staged = _flops(lambda: _pruned(arch, batches, "wanda", True))
    default = _flops(lambda: _pruned(arch, batches, "wanda", False))
    assert staged <= one_pass < default, (staged, one_pass, default)


def test_true_sequential_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="true_sequential=True needs sequential=True"):
        PruningConfig(true_sequential=True, sequential=False)
    with pytest.raises(ValueError, match="structured_fraction"):
        PruningConfig(true_sequential=True, structured_fraction=0.5)
    with pytest.raises(ValueError, match="prunes each block jointly"):
        PruningConfig(true_sequential=True, method="sparsellm")


def test_no_autograd_graph_is_built_while_calibrating():
    """The staged passes run without gradients: a block's inputs never carry a graph through the earlier blocks
    (which would hold every block's activations until the end)."""
    model, batches = BUILDERS["llama"](), random_batches(num=2)
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].requires_grad))
    prune_model(model, batches, PruningConfig(sparsity=SPARSITY, true_sequential=True), progress=False)
    assert seen and not any(seen)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_the_attention_runs_once_per_batch_plus_two(arch, monkeypatch):
    """o's stage keeps its inputs, so the next pass takes the attention's output from o on them instead of
    running the attention again. Per layer: one attention call per batch (o's own pass), one on the first batch
    of q/k/v's pass (which runs on until a projection outside the stage, to learn the stage's members) and one on
    the first batch of the pass after o's (which checks that the attention returns o's output). Without the
    shortcut the pass after o's ran the attention on every batch again."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))  # fmt: skip
    batches = random_batches(num=4)
    model = _pruned(arch, batches, "wanda", True)
    assert len(calls) == model.config.num_hidden_layers * (len(batches) + 2)


@pytest.mark.parametrize(("attention", "runs_per_layer"), [("sdpa", lambda b: b), ("eager", lambda b: 2 * b - 1)])
def test_q_runs_once_per_batch_unless_the_attention_cannot_be_shortcut(attention, runs_per_layer, monkeypatch):
    """In o's pass q/k/v run pruned and only their first batch's outputs are kept (the pass after o's needs no
    more where it takes the attention's output from o). SDPA attention returns o's output alone: q runs once per
    batch. Eager attention also returns its weights, so the pass after o's runs the attention on every batch, and q
    with it on every batch but the first: memory traded for those matmuls, with the same results (above)."""
    linear = torch.nn.functional.linear
    model = BUILDERS["llama"]()
    q_weights = {id(layer.self_attn.q_proj.weight) for layer in model.model.layers}
    calls = []
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: calls.append(id(w) in q_weights) or linear(x, w, b))  # fmt: skip
    model.set_attn_implementation(attention)
    batches = random_batches(num=4)
    prune_model(model, batches, PruningConfig(sparsity=SPARSITY, true_sequential=True), progress=False)
    assert sum(calls) == model.config.num_hidden_layers * runs_per_layer(len(batches))
