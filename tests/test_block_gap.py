"""bench/block_gap.py's split prune: every block but the last by one method, the last by another, each projection
at the uniform sparsity, the body exactly as the first method alone prunes it."""

from __future__ import annotations

import pytest
import torch
from conftest import load_bench_script, make_llama, random_batches


@pytest.fixture(scope="module")
def block_gap():
    return load_bench_script("block_gap")


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("proj.weight")}


def test_split_prune_keeps_the_body_and_prunes_the_last_block_otherwise(block_gap):
    batches = random_batches()
    whole, split = make_llama(), make_llama()
    block_gap.prune(whole, batches, 0.5, "sparsellm")
    block_gap.prune(split, batches, 0.5, "sparsellm+sparsegpt")
    whole_w, split_w = _weights(whole), _weights(split)
    last = f"model.layers.{len(split.model.layers) - 1}."
    for name, weight in split_w.items():
        zeros = int((weight == 0).sum())
        assert zeros == weight.numel() // 2, name  # exact uniform count in the body and in the last block
        if not name.startswith(last):
            assert torch.equal(weight, whole_w[name]), name  # the body does not depend on how the last block goes
    mlp = [n for n in split_w if n.startswith(last) and ".mlp." in n]
    assert len(mlp) == 3
    assert all(not torch.equal(split_w[n], whole_w[n]) for n in mlp)  # SparseGPT, not SparseLLM's joint solve
