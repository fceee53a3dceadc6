"""Mask store: bit packing, in-place masking, optimizer moments, compact checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mosaic_lightning.core.masks import MaskStore, pack_bits, unpack_bits


def _random_mask(shape, seed=0, p=0.5) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > p


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (13, 17), (2, 3, 5), (64, 129)])
def test_pack_unpack_round_trip(shape):
    mask = _random_mask(shape, seed=sum(shape))
    packed = pack_bits(mask)
    numel = mask.numel()
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-numel // 8)
    unpacked = unpack_bits(packed, shape)
    assert unpacked.dtype == torch.bool and tuple(unpacked.shape) == shape
    torch.testing.assert_close(unpacked, mask, rtol=0, atol=0)


def test_pack_bits_is_msb_first():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0b10000001, 0b11000000]
    assert pack_bits(torch.ones(16, dtype=torch.bool)).tolist() == [255, 255]


def _linear(seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(7, 5)


def test_apply_zeroes_pruned_and_keeps_the_rest():
    model = _linear()
    before = model.weight.detach().clone()
    bias = model.bias.detach().clone()
    keep = _random_mask((5, 7), seed=1)
    store = MaskStore()
    store.set("weight", keep)
    store.enforce_(model)
    assert (model.weight[~keep] == 0).all()
    torch.testing.assert_close(model.weight[keep], before[keep], rtol=0, atol=0)
    torch.testing.assert_close(model.bias, bias, rtol=0, atol=0)
    assert store.num_pruned() == int((~keep).sum()) and store.numel() == 35
    assert "weight" in store and len(store) == 1


def test_zero_optimizer_state_zeroes_adam_moments_at_pruned_entries():
    model = _linear()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        optimizer.zero_grad()
        (model(torch.randn(4, 7, generator=g)) ** 2).sum().backward()
        optimizer.step()
    state = optimizer.state[model.weight]
    assert (state["exp_avg"] != 0).all() and (state["exp_avg_sq"] != 0).all()
    saved = {k: v.clone() for k, v in state.items()}
    bias_state = {k: v.clone() for k, v in optimizer.state[model.bias].items()}

    keep = _random_mask((5, 7), seed=3)
    store = MaskStore()
    store.set("weight", keep)
    store.enforce_(model, [optimizer])

    for name in ("exp_avg", "exp_avg_sq"):
        assert (state[name][~keep] == 0).all()
        torch.testing.assert_close(state[name][keep], saved[name][keep], rtol=0, atol=0)
    torch.testing.assert_close(state["step"], saved["step"])
    for k, v in optimizer.state[model.bias].items():
        torch.testing.assert_close(v, bias_state[k], rtol=0, atol=0)


def test_state_dict_round_trip_and_is_compact():
    shapes = {"a.weight": (256, 512), "b.weight": (33, 7)}
    store = MaskStore()
    for i, (name, shape) in enumerate(shapes.items()):
        store.set(name, _random_mask(shape, seed=10 + i))

    state = store.state_dict()
    for name, shape in shapes.items():
        assert state[name]["shape"] == list(shape)
        bits = state[name]["bits"]
        assert bits.dtype == torch.uint8
        assert bits.numel() == -(-(shape[0] * shape[1]) // 8)

    buffer = io.BytesIO()
    torch.save(state, buffer)
    numel = sum(a * b for a, b in shapes.values())
    assert buffer.tell() < numel / 8 + 4096, buffer.tell()  # packed bits plus a little pickle overhead

    restored = MaskStore()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert restored.masks.keys() == store.masks.keys()
    for name in shapes:
        torch.testing.assert_close(restored.masks[name], store.masks[name], rtol=0, atol=0)
