"""Shared fixtures: tiny random Llama / GPT-2 / OPT models (seeded), random calibration batches, and the tiny
LightningModule and resumable loader the training tests (and the tests/distributed scripts) share."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import lightning as L
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


# Config fields Llama and OPT share (GPT-2 names them differently).
_SHARED_CONFIG = {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB}


def _seeded(model_cls, config, seed: int):
    torch.manual_seed(seed)
    return model_cls(config).eval()


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    return _seeded(LlamaForCausalLM, LlamaConfig(**_SHARED_CONFIG, intermediate_size=128, num_key_value_heads=2), seed)


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=1
    )
    return _seeded(GPT2LMHeadModel, config, seed)


def make_opt(seed: int = 0) -> OPTForCausalLM:
    config = OPTConfig(
        **_SHARED_CONFIG,
        ffn_dim=128,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    return _seeded(OPTForCausalLM, config, seed)


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {"llama": make_llama, "gpt2": make_gpt2, "opt": make_opt}

# The prunable projections of one Llama decoder layer, by module path within the layer.
LLAMA_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# Weight parameters of every prunable projection per architecture, written out by hand (independent of the
# library's adapter), so tests can count zeros without trusting the code under test.
TARGET_PARAMS: dict[str, list[str]] = {
    "llama": [f"model.layers.{i}.{p}.weight" for i in range(2) for p in LLAMA_PROJECTIONS],
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
def _environment_restored():
    """Lightning's strategies write LOCAL_RANK, NODE_RANK, MASTER_PORT... into ``os.environ`` of the process that
    builds them; a later test's multi-process script inheriting them would take itself for an already launched
    rank and wait for its peers forever. Each test gets the environment back as it found it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


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


def load_bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (the bench scripts are not a package); ``bench/`` is on ``sys.path`` while it
    loads, as when the script runs, so it can import its sibling scripts."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", f"{bench}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(bench)
    return module


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


class TinyLM(L.LightningModule):
    """A tiny causal LM as ``self.model`` (what the callbacks look for), trained on its own LM loss.

    Args:
        builder: makes the model (``make_llama``, ``make_gpt2``, ...); it comes back in eval mode.
        train_mode: put the model in train mode (dropout on); Lightning's fit keeps the mode it is given.
        optimizer: the torch optimizer class, over the parameters that require grad only (as CausalLM does), so
            frozen base weights (LoRA) never enter the optimizer.
        lr: its learning rate.
    """

    def __init__(
        self,
        builder: Callable[[], torch.nn.Module] = make_llama,
        *,
        train_mode: bool = False,
        optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
        lr: float = 1e-2,
    ) -> None:
        super().__init__()
        self.model = builder()
        if train_mode:
            self.model.train()
        self.optimizer_cls, self.lr = optimizer, lr

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch  # a tensor, or a dataset's dict rows
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss

    def configure_optimizers(self):
        return self.optimizer_cls([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class ResumableBatches:
    """Four different ``[2, 16]`` batches per epoch that resume where they stopped: Lightning saves and restores
    the state of loaders that have ``state_dict``/``load_state_dict``, so a resumed run sees the same data order."""

    def __init__(self) -> None:
        self.data = torch.randint(0, VOCAB, (8, SEQ_LEN), generator=torch.Generator().manual_seed(3)).split(2)
        self.position = 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        while self.position < len(self.data):
            self.position += 1
            yield self.data[self.position - 1]
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A tiny random Llama with the bundled tokenizer, saved as a plain HF directory (fast CLI runs)."""
    return save_tiny_llama(tmp_path / "tiny")


def save_tiny_llama(folder: Path, layers: int = 2) -> Path:
    """What ``tiny_model_dir`` holds, saved into ``folder`` (for fixtures of a wider scope than one test)."""
    from mosaic_lightning.core.assets import BUNDLED_MODEL, load_tokenizer

    tokenizer = load_tokenizer(BUNDLED_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer))  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text_files(folder: Path) -> tuple[Path, Path]:
    """train.txt / eval.txt of plain text in ``folder`` (different text for the two)."""
    text = " ".join(f"word{i % 97} and more text number {i}." for i in range(1500))
    (folder / "train.txt").write_text(text)
    (folder / "eval.txt").write_text(" ".join(f"other{i % 89} words, line {i}." for i in range(1500)))
    return folder / "train.txt", folder / "eval.txt"
