"""Perplexity against Hugging Face's own causal-LM loss."""

from __future__ import annotations

import datetime
import math

import pytest
import torch
from conftest import random_batches

from mosaic_lightning import perplexity


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_perplexity_equals_exp_mean_hf_loss(request, fixture):
    model = request.getfixturevalue(fixture)
    batches = random_batches(num=3, batch=2, seq_len=12, seed=7)  # equal-length windows
    with torch.no_grad():
        losses = [float(model(input_ids=ids, labels=ids, use_cache=False).loss) for ids in batches]
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(model, batches, progress=False) == pytest.approx(expected, rel=1e-4)
    # Dict batches (as a DataLoader over TokenWindows yields) give the same number.
    dict_batches = [{"input_ids": ids} for ids in batches]
    assert perplexity(model, dict_batches, progress=False) == pytest.approx(expected, rel=1e-4)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=2.0,
    )
    return Gemma2ForCausalLM(config).eval()  # fmt: skip


@pytest.mark.parametrize("fixture", ["llama", "gpt2", "opt", "gemma2"])
def test_chunked_loss_equals_hf_loss_at_every_chunk_size(request, fixture, monkeypatch):
    """The loss is scored a few positions at a time (never the whole logits tensor): with chunks of 1, 5 and all
    positions it equals HF's own loss, including OPT's projection and Gemma 2's soft-capped logits."""
    import mosaic_lightning.evaluation.perplexity as evaluation

    model = _gemma2() if fixture == "gemma2" else request.getfixturevalue(fixture)
    batches = random_batches(num=2, batch=2, seq_len=12, seed=3)
    with torch.no_grad():
        losses = [float(model(input_ids=ids, labels=ids, use_cache=False).loss) for ids in batches]
    expected = math.exp(sum(losses) / len(losses))
    vocab = model.config.vocab_size
    for positions in (1, 5, 12):
        monkeypatch.setattr(evaluation, "LOGIT_CHUNK_VALUES", positions * 2 * vocab)  # batch 2
        assert perplexity(model, batches, progress=False) == pytest.approx(expected, rel=1e-5), positions


def test_perplexity_restores_training_mode_and_sees_pruning(llama):
    batches = random_batches(num=2, seed=8)
    llama.train()
    dense = perplexity(llama, batches, progress=False)
    assert llama.training
    with torch.no_grad():
        llama.lm_head.weight.mul_(3.0)  # sharper, wrong logits on random data
    assert perplexity(llama, batches, progress=False) > dense


def _distributed_perplexity(rank: int, port: int, batches, out) -> None:
    import torch.distributed as dist
    from conftest import make_llama

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )  # a stray collective fails instead of hanging
    try:
        model, calls = make_llama(), []
        model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
        shared = perplexity(model, batches, progress=False, distributed=True)
        forwards = len(calls)
        if rank == 0:  # the default, on one rank only: it scores everything and must not wait for rank 1
            alone = perplexity(model, batches, progress=False)
            out["alone"] = (alone, len(calls) - forwards)
        out[rank] = (shared, forwards)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_perplexity_shares_batches_and_equals_one_process(llama):
    """2 gloo ranks over 5 batches with distributed=True: rank 0 scores 3, rank 1 scores 2 and repeats one unscored
    forward (ranks must run equally many forwards under ZeRO-3); the reduced result equals one process scoring all
    5. The default scores everything on the calling rank without any collective."""
    import socket

    import torch.multiprocessing as mp

    batches = random_batches(num=5, batch=2, seq_len=12, seed=9)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_distributed_perplexity, args=(port, batches, out), nprocs=2)
    expected = perplexity(llama, batches, progress=False)
    for rank in (0, 1):
        shared, forwards = out[rank]
        assert shared == pytest.approx(expected, rel=1e-6) and forwards == 3
    alone, alone_forwards = out["alone"]
    assert alone == pytest.approx(expected, rel=1e-6) and alone_forwards == 5
