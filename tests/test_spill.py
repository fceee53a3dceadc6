"""Tensors held in files (the pending results of an in-memory run): what goes in comes back bit for bit."""

from __future__ import annotations

import pytest
import torch

from mosaic_lightning.pruning.spill import SpilledTensors


def test_round_trip_is_bitwise_and_on_the_cpu(tmp_path):
    store = SpilledTensors(tmp_path)
    values = {"0.q": torch.randn(7, dtype=torch.float32), "0.down": torch.randn(5).to(torch.bfloat16),
              "0.keep": torch.rand(4, 6) > 0.5}  # fmt: skip
    for key, value in values.items():
        store[key] = value
    assert set(store) == set(values) and len(store) == 3
    for key, value in values.items():
        back = store[key]
        assert back.dtype == value.dtype and back.device.type == "cpu"
        assert torch.equal(back, value)


def test_a_key_is_one_file_and_deleting_it_deletes_the_file(tmp_path):
    store = SpilledTensors(tmp_path)
    store["a"] = torch.zeros(3)
    store["a"] = torch.ones(3)  # written again: still one file, the new values
    assert len(list(tmp_path.iterdir())) == 1
    assert torch.equal(store.pop("a"), torch.ones(3))
    assert list(tmp_path.iterdir()) == [] and "a" not in store
    assert store.get("a") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_tensor_comes_back_on_the_device_it_was_stored_from(tmp_path):
    store = SpilledTensors(tmp_path)
    store["gpu"], store["cpu"] = torch.arange(4, device="cuda"), torch.arange(4)
    assert store["gpu"].device.type == "cuda" and store["cpu"].device.type == "cpu"
