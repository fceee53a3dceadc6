"""Shared fixtures: tiny random Llama / GPT-2 / OPT models (seeded) and random calibration batches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 128
HIDDEN = 64
SEQ_LEN = 16


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=1
    )
    return GPT2LMHeadModel(config).eval()


def make_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        hidden_size=HIDDEN,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    return OPTForCausalLM(config).eval()


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {"llama": make_llama, "gpt2": make_gpt2, "opt": make_opt}

# Weight parameters of every prunable projection per architecture, written out by hand (independent of the
# library's adapter), so tests can count zeros without trusting the code under test.
TARGET_PARAMS: dict[str, list[str]] = {
    "llama": [
        f"model.layers.{i}.{p}.weight"
        for i in range(2)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ],
    "gpt2": [
        f"transformer.h.{i}.{p}.weight"
        for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ],
    "opt": [
        f"model.decoder.layers.{i}.{p}.weight"
        for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
    ],
}


@pytest.fixture(autouse=True)
def _single_thread(request):
    """Tiny tensors run fastest on one thread, and two torch threads fighting a busy 2-core machine slow these
    tests down by ~40x. Real-model tests keep torch's default."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_batches(num: int = 2, batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq_len), generator=g) for _ in range(num)]


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return make_llama()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return make_gpt2()


@pytest.fixture
def opt() -> OPTForCausalLM:
    return make_opt()


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    """Parametrises a test over the three tiny architectures."""
    return request.param


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    """Two calibration batches of ``input_ids``, each ``[2, 16]``."""
    return random_batches()


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, equal_nan=True, msg=f"{name} changed")
