"""Model adapter: projections found per architecture, [out, in] views, GPT-2's fused c_attn, target filters."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from mosaic_lightning.core.adapters import ArchitectureSpec, ModelAdapter, detect_architecture

LLAMA_EXPECTED = {
    "q": ("self_attn.q_proj", (64, 64)),
    "k": ("self_attn.k_proj", (32, 64)),  # 2 kv heads x head_dim 16
    "v": ("self_attn.v_proj", (32, 64)),
    "o": ("self_attn.o_proj", (64, 64)),
    "gate": ("mlp.gate_proj", (128, 64)),
    "up": ("mlp.up_proj", (128, 64)),
    "down": ("mlp.down_proj", (64, 128)),
}
OPT_EXPECTED = {
    "q": ("self_attn.q_proj", (64, 64)),
    "k": ("self_attn.k_proj", (64, 64)),
    "v": ("self_attn.v_proj", (64, 64)),
    "o": ("self_attn.out_proj", (64, 64)),
    "up": ("fc1", (128, 64)),
    "down": ("fc2", (64, 128)),
}
GPT2_EXPECTED = {
    "q": ("attn.c_attn", (64, 64)),
    "k": ("attn.c_attn", (64, 64)),
    "v": ("attn.c_attn", (64, 64)),
    "o": ("attn.c_proj", (64, 64)),
    "up": ("mlp.c_fc", (256, 64)),  # n_inner defaults to 4 * n_embd
    "down": ("mlp.c_proj", (64, 256)),
}


@pytest.mark.parametrize(
    ("fixture", "blocks", "expected"),
    [
        ("llama", "model.layers", LLAMA_EXPECTED),
        ("opt", "model.decoder.layers", OPT_EXPECTED),
        ("gpt2", "transformer.h", GPT2_EXPECTED),
    ],
)
def test_projections_found_with_names_and_out_in_shapes(request, fixture, blocks, expected):
    model = request.getfixturevalue(fixture)
    adapter = ModelAdapter(model)
    assert adapter.num_layers == 2
    assert adapter.spec.blocks == blocks
    for layer in range(2):
        projs = adapter.projections(layer)
        assert [p.name for p in projs] == list(expected)  # execution order
        for p in projs:
            path, shape = expected[p.name]
            assert p.key == f"{layer}.{p.name}"
            assert p.param_name == f"{blocks}.{layer}.{path}.weight"
            assert adapter.module_name(p) == f"{blocks}.{layer}.{path}"
            assert p.module is model.get_submodule(f"{blocks}.{layer}.{path}")
            assert tuple(p.weight_view().shape) == shape
            assert (p.out_features, p.in_features) == shape
            assert p.numel == shape[0] * shape[1]
    assert len(adapter.all_projections()) == 2 * len(expected)


def test_linear_views_share_storage_with_the_weight(llama):
    adapter = ModelAdapter(llama)
    proj = adapter.projections(1)[3]  # o
    proj.weight_view()[2, 5] = 42.0
    assert llama.model.layers[1].self_attn.o_proj.weight[2, 5] == 42.0


def test_gpt2_fused_c_attn_split_into_q_k_v_views_that_write_through(gpt2):
    adapter = ModelAdapter(gpt2)
    c_attn = gpt2.transformer.h[0].attn.c_attn
    q, k, v = adapter.projections(0)[:3]
    assert q.module is k.module is v.module is c_attn
    assert tuple(c_attn.weight.shape) == (64, 192)  # Conv1D stores [in, out]
    for i, p in enumerate((q, k, v)):
        assert p.transposed
        torch.testing.assert_close(p.weight_view(), c_attn.weight.t()[64 * i : 64 * (i + 1)], rtol=0, atol=0)

    # Writing into the [out, in] view lands at the transposed place of the Conv1D weight.
    k.weight_view()[2, 3] = 7.0
    assert c_attn.weight[3, 64 + 2] == 7.0
    v.weight_view()[:, 0] = 0.0
    assert (c_attn.weight[0, 128:192] == 0).all()
    assert (c_attn.weight[0, :128] != 0).all()

    # And the views really are GPT-2's q, k and v: x @ W_part^T + b_part is that slice of c_attn's output.
    x = torch.randn(3, 64)
    out = c_attn(x)
    for i, p in enumerate((q, k, v)):
        torch.testing.assert_close(
            out[:, 64 * i : 64 * (i + 1)], x @ p.weight_view().t() + c_attn.bias[64 * i : 64 * (i + 1)]
        )


def test_gpt2_to_param_layout_writes_only_its_slice(gpt2):
    adapter = ModelAdapter(gpt2)
    k = adapter.projections(0)[1]
    full = torch.ones_like(k.weight, dtype=torch.bool)
    part = torch.zeros(64, 64, dtype=torch.bool)
    part[5, 9] = True
    k.to_param_layout(part, full)
    assert full.shape == (64, 192)
    assert int((~full).sum()) == 64 * 64 - 1
    torch.testing.assert_close(full[:, 64:128], part.t(), rtol=0, atol=0)
    assert full[9, 64 + 5]
    assert full[:, :64].all() and full[:, 128:].all()


def test_projection_modules_lists_a_fused_module_once(gpt2):
    adapter = ModelAdapter(gpt2)
    modules = adapter.projection_modules(0)
    assert len(modules) == 4
    assert modules[0] is gpt2.transformer.h[0].attn.c_attn


def test_targets_by_short_name(llama, gpt2):
    adapter = ModelAdapter(llama, targets=["q", "down"])
    assert [[p.name for p in adapter.projections(i)] for i in range(2)] == [["q", "down"], ["q", "down"]]
    adapter = ModelAdapter(gpt2, targets=["k"])
    assert [p.key for p in adapter.all_projections()] == ["0.k", "1.k"]


def test_exclude_by_short_name(opt):
    adapter = ModelAdapter(opt, exclude=["q", "k", "v"])
    assert [p.name for p in adapter.projections(0)] == ["o", "up", "down"]


def test_targets_and_exclude_by_regex(llama):
    adapter = ModelAdapter(llama, targets=[r"model\.layers\.0\..*"])
    assert len(adapter.projections(0)) == 7 and adapter.projections(1) == []
    adapter = ModelAdapter(llama, targets=[r".*\.mlp\..*"], exclude=[r"model\.layers\.1\.mlp\.up_proj", "gate"])
    assert [p.key for p in adapter.all_projections()] == ["0.up", "0.down", "1.down"]


@pytest.mark.parametrize("field", ["targets", "exclude"])
def test_unknown_name_raises_listing_valid_names(llama, field):
    with pytest.raises(ValueError) as info:
        ModelAdapter(llama, **{field: ["q", "query_proj"]})
    message = str(info.value)
    assert field in message and "'query_proj'" in message
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        assert f"'{name}'" in message
    assert "model.layers.0.self_attn.q_proj" in message  # shows what a regex is matched against


def test_selecting_nothing_raises(llama):
    with pytest.raises(ValueError, match="select no projection"):
        ModelAdapter(llama, targets=["q"], exclude=["q"])


def test_unknown_architecture_error_lists_linear_layers():
    model = nn.Sequential(
        OrderedDict(encoder=nn.Linear(8, 16), act=nn.ReLU(), decoder=nn.Linear(16, 16), head=nn.Linear(16, 4))
    )
    with pytest.raises(ValueError) as info:
        ModelAdapter(model)
    message = str(info.value)
    assert "unknown architecture Sequential" in message
    found = message.split("Linear layers found: ")[1].split(". ")[0]
    assert found == "encoder, decoder, head"
    assert "ArchitectureSpec" in message
    with pytest.raises(ValueError, match="encoder"):
        detect_architecture(model)


class _ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"qkv": nn.Linear(8, 24), "out": nn.Linear(8, 8)})
        self.ff = nn.Linear(8, 8)


class _ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([_ToyBlock(), _ToyBlock(), _ToyBlock()])


def test_custom_spec_for_an_unknown_architecture():
    model = _ToyModel()
    spec = ArchitectureSpec(
        blocks="stack", projections={"qkv": "attn.qkv", "o": "attn.out", "down": "ff"}, fused={"qkv": ("q", "k", "v")}
    )
    adapter = ModelAdapter(model, spec=spec)
    assert adapter.num_layers == 3
    assert [p.name for p in adapter.projections(2)] == ["q", "k", "v", "o", "down"]
    q, k = adapter.projections(0)[:2]
    assert not k.transposed and tuple(k.weight_view().shape) == (8, 8)
    torch.testing.assert_close(k.weight_view(), model.stack[0].attn.qkv.weight[8:16], rtol=0, atol=0)

    bad = ArchitectureSpec(blocks="stack", projections={"q": "attn.nope"})
    with pytest.raises(ValueError, match="attn.nope"):
        ModelAdapter(model, spec=bad)
    with pytest.raises(ValueError, match="ModuleList"):
        ModelAdapter(model, spec=ArchitectureSpec(blocks="stack.0", projections={"down": "ff"}))
