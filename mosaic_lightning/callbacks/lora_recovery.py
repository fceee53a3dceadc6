"""``LoRARecovery``: after ``MosaicPruning`` prunes one-shot, train LoRA adapters on the pruned projections, then
merge them without regrowing a single pruned weight.

Why LoRA: recovery then trains a few parameters per projection while the pruned base weights stay frozen, so their
zeros cannot move during training. Why a masked merge: a plain merge ``W + scale·BA`` is dense and would undo the
pruning; ``W + mask ⊙ (scale·BA)`` keeps every pruned weight (structured units included) at exactly zero. Since
pruned entries of ``W`` are already zero, that is a plain merge followed by re-applying the pruning masks.

Lifecycle (single-device strategies; the adapter is attached after the strategy has set the model up):

* attach: in ``on_fit_start`` when ``MosaicPruning`` already has its masks (it comes earlier in
  ``trainer.callbacks``, or its masks came back from a checkpoint); otherwise in ``on_train_start``, which runs
  after every ``on_fit_start`` (``LightningCLI`` appends its ``pruning`` group *after* ``trainer.callbacks``).
  Attaching wraps the model with peft (``pl_module.model`` becomes a ``PeftModel``, whose parameter names
  :func:`~mosaic_lightning.masks.canonical_name` maps back to the HF names) and rebuilds the optimizers, because
  Lightning built them before ``on_fit_start`` from the then-trainable base weights.
* detach: in ``on_train_end`` (``on_fit_end`` when the loop never ran, e.g. ``max_steps=0``): save the adapter
  (optional), merge with the masks and unload, so ``on_fit_end`` callbacks (``CompactOnFitEnd``) and the CLI's
  export after ``fit`` see the plain Hugging Face model with its original parameter names.
* checkpoints: the module's state dict is written in plain-HF form (no ``lora_``/``base_layer`` keys) and the
  adapter weights go into this callback's state, so a fresh module loads the checkpoint before the adapter exists
  (Lightning restores module weights before ``on_fit_start``); on resume the adapter is attached in
  ``on_fit_start`` with the saved weights, before Lightning restores the optimizer state that belongs to it.
"""

from __future__ import annotations

import pathlib
import re

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..adapters import CANONICAL_NAMES, ModelAdapter
from ..export import atomic_directory
from ..masks import MaskStore, canonical_name
from .mosaic_pruning import MosaicPruning, causal_lm

_MODEL_ATTR = "model"  # where the LightningModule keeps the HF model; the checkpoint keys start with it


class LoRARecovery(L.Callback):
    """Recover quality after one-shot pruning with LoRA adapters that are merged back without losing sparsity.

    Put it after ``MosaicPruning`` (any order works; see the module docstring). The LightningModule must keep its
    Hugging Face model at ``.model`` and build its optimizer from trainable parameters only (as
    :class:`~mosaic_lightning.CausalLM` does), since frozen base weights must stay bit-identical.

    Args:
        r: LoRA rank (>= 1).
        alpha: LoRA scaling numerator; the update is ``alpha / r · B A``.
        dropout: dropout on the LoRA input, in [0, 1).
        targets: projections to adapt, by short name (q, k, v, o, gate, up, down) or module-name regex; each must
            have been pruned. None = every projection ``MosaicPruning`` pruned. GPT-2's fused ``c_attn`` takes one
            adapter for q, k and v together.
        adapter_dir: if set, save the adapter alone (peft ``save_pretrained``) at fit end, before merging. Must
            not exist or be an empty directory.
        merge: merge the adapter into the pruned weights at fit end (keeping every pruned zero) and unload, so
            ``pl_module.model`` is the plain HF model again. False keeps the ``PeftModel``; merge it later with
            :func:`merge_keeping_sparsity` (peft's own ``merge_and_unload`` would fill the pruned zeros).
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        targets: list[str] | None = None,
        adapter_dir: str | None = None,
        merge: bool = True,
    ) -> None:
        super().__init__()
        self.r = _check_rank(r)
        self.alpha = _check_alpha(alpha)
        self.dropout = _check_dropout(dropout)
        self.targets = _check_targets(targets)
        if adapter_dir is not None:
            _check_adapter_dir(adapter_dir)
        self.adapter_dir = adapter_dir
        if not isinstance(merge, bool):
            raise TypeError(f"merge={merge!r}; allowed values: True, False")
        self.merge = merge
        self.attached = False
        self.merged = False
        self._pending: dict[str, torch.Tensor] | None = None  # adapter weights from a checkpoint
        self._trainable: dict[str, bool] = {}  # base requires_grad flags, restored after unloading
        self._peft_model: nn.Module | None = None  # while attached (state_dict() gets no module argument)
        self._finished = False  # adapter saved / merged for this fit (on_train_end and on_fit_end both call it)

    # -- loop events ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _check_strategy(trainer)
        pruning = _find_pruning(trainer)
        if self.adapter_dir is not None:
            _check_adapter_dir(self.adapter_dir)
        self._finished = False
        if self.attached:  # merge=False in an earlier fit: keep training the same adapter
            return
        if pruning.masks is not None:
            self._attach(trainer, pl_module, pruning.masks)
        elif trainer.callbacks.index(pruning) < trainer.callbacks.index(self):
            raise RuntimeError(_NO_MASKS)
        # else MosaicPruning prunes later in this hook round; attach in on_train_start.

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.attached:
            return
        pruning = _find_pruning(trainer)
        if pruning.masks is None:
            raise RuntimeError(_NO_MASKS)
        self._attach(trainer, pl_module, pruning.masks)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)  # no-op unless the training loop was skipped

    # -- attach / detach --------------------------------------------------------------------------------
    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, masks: MaskStore) -> None:
        """Freeze the base, wrap it with LoRA on the pruned projections, train only the adapter."""
        from peft import LoraConfig, get_peft_model

        model = _hf_model(pl_module)
        modules = self._lora_modules(model, masks)
        self._trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=modules,
            fan_in_fan_out=any(not isinstance(model.get_submodule(m), nn.Linear) for m in modules),  # GPT-2 Conv1D
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        if self._pending is not None:
            _load_lora_weights(peft_model, self._pending)
            self._pending = None
        setattr(pl_module, _MODEL_ATTR, peft_model)
        self._peft_model = peft_model
        self.attached, self.merged, self._finished = True, False, False
        trainer.strategy.setup_optimizers(trainer)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        rank_zero_info(f"LoRARecovery: r={self.r} on {len(modules)} projections, {trainable:,} trainable parameters")

    def _lora_modules(self, model: nn.Module, masks: MaskStore) -> list[str]:
        """Module names to adapt; every one must carry a pruning mask, or the merge could not keep its zeros."""
        pruned = sorted(name.removesuffix(".weight") for name in masks.masks)
        if self.targets is None:
            return pruned
        adapter = ModelAdapter(model, targets=self.targets)
        chosen = sorted({adapter.module_name(p) for p in adapter.all_projections()})
        missing = [m for m in chosen if m not in set(pruned)]
        if missing:
            short = _short_names(model)
            raise ValueError(
                f"targets={self.targets!r} selects projections MosaicPruning did not prune: "
                f"{sorted({short.get(m, m) for m in missing})} (e.g. {missing[0]!r}); pruned projections: "
                f"{sorted({short.get(m, m) for m in pruned})} ({len(pruned)} modules). LoRA recovery adapts "
                "pruned projections only; choose targets among those, or None for all of them"
            )
        return chosen

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the adapter (optional), then merge it keeping sparsity and unload (optional)."""
        peft_model = self._peft_model
        if peft_model is None or self._finished:
            return
        self._finished = True
        if self.adapter_dir is not None and trainer.is_global_zero:
            _save_adapter(peft_model, self.adapter_dir)
            rank_zero_info(f"LoRARecovery: saved the adapter to {self.adapter_dir}")
        if not self.merge:
            return
        pruning = _find_pruning(trainer)
        model = merge_keeping_sparsity(peft_model, pruning.masks)
        for name, param in model.named_parameters():
            param.requires_grad_(self._trainable.get(name, param.requires_grad))
        setattr(pl_module, _MODEL_ATTR, model)
        self._peft_model = None
        self.attached, self.merged = False, True
        if pruning.report is not None:
            pruning.report.metrics.update(lora_rank=self.r, lora_recovery_steps=trainer.global_step)

    # -- checkpointing ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Write the module weights as the plain HF model (the adapter lives in this callback's state), so a
        fresh module, which has no adapter when Lightning restores it, loads them with strict key checking."""
        if self.attached:
            checkpoint["state_dict"] = plain_state_dict(checkpoint["state_dict"], f"{_MODEL_ATTR}.")

    def state_dict(self) -> dict:
        lora = lora_weights(self._peft_model) if self._peft_model is not None else None
        return {"r": self.r, "alpha": self.alpha, "targets": self.targets, "merged": self.merged, "lora": lora}

    def load_state_dict(self, state_dict: dict) -> None:
        for name in ("r", "alpha", "targets"):
            if state_dict.get(name) != getattr(self, name):
                raise ValueError(
                    f"LoRARecovery {name}={getattr(self, name)!r} differs from the checkpoint's "
                    f"{name}={state_dict.get(name)!r}; resume with the same adapter settings"
                )
        self._pending = state_dict.get("lora")
        self.merged = bool(state_dict.get("merged", False))


_NO_MASKS = (
    "LoRARecovery: MosaicPruning has no masks at fit start. LoRA recovery needs a one-shot prune at fit start "
    "(schedule=OneShot(), the default); Gradual, OneShot(at_step=N) and ADMM schedules prune later"
)


# -- helpers ----------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_keeping_sparsity(peft_model: nn.Module, masks: MaskStore) -> nn.Module:
    """Merge LoRA into the base weights as ``W + mask ⊙ (scale·B A)`` and return the unloaded HF model.

    Pruned entries of ``W`` are zero, so this equals peft's plain merge followed by re-applying the masks, which is
    how it is computed (peft handles Conv1D layout, dtype casts and adapter scaling).
    """
    model = peft_model.merge_and_unload()
    masks.apply_(model)
    return model


def lora_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors by canonical name (``...q_proj.lora_A.default.weight``), detached CPU copies."""
    return {
        canonical_name(name): param.detach().cpu().clone()
        for name, param in peft_model.named_parameters()
        if _is_lora_key(name)
    }


def plain_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` with the peft wrapper under ``prefix`` written as the plain HF model: adapter keys dropped,
    ``base_model.model.`` and ``.base_layer.`` removed."""
    plain = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            plain[key] = value
        elif not _is_lora_key(key):
            plain[prefix + canonical_name(key.removeprefix(prefix))] = value
    return plain


def _is_lora_key(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


@torch.no_grad()
def _load_lora_weights(peft_model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = {canonical_name(n): p for n, p in peft_model.named_parameters() if _is_lora_key(n)}
    if params.keys() != weights.keys():
        extra, absent = sorted(weights.keys() - params.keys()), sorted(params.keys() - weights.keys())
        raise ValueError(
            f"LoRARecovery: the checkpoint's adapter does not fit this model: {len(extra)} saved tensors have no "
            f"place (e.g. {extra[:1]}), {len(absent)} adapter tensors are not saved (e.g. {absent[:1]})"
        )
    for name, param in params.items():
        param.copy_(weights[name])


def _find_pruning(trainer: L.Trainer) -> MosaicPruning:
    pruning = next((cb for cb in trainer.callbacks if isinstance(cb, MosaicPruning)), None)
    if pruning is None:
        raise RuntimeError("LoRARecovery needs a MosaicPruning callback in trainer.callbacks (it adapts its masks)")
    if not getattr(pruning.schedule, "prunes_at_fit_start", False):
        raise RuntimeError(f"{_NO_MASKS}; got schedule={type(pruning.schedule).__name__}")
    return pruning


def _check_strategy(trainer: L.Trainer) -> None:
    """The adapter is attached after the strategy set the model up; a DDP/FSDP/DeepSpeed wrapper built then
    would not know the LoRA parameters, so refuse rather than train them wrong."""
    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        raise RuntimeError(
            f"LoRARecovery supports single-device strategies only; got strategy={type(trainer.strategy).__name__}"
        )


def _hf_model(pl_module: L.LightningModule) -> nn.Module:
    model = causal_lm(pl_module)
    if getattr(pl_module, _MODEL_ATTR, None) is not model:
        raise TypeError(
            f"LoRARecovery needs the Hugging Face model at `{type(pl_module).__name__}.{_MODEL_ATTR}` (it swaps in "
            "the peft wrapper there); see mosaic_lightning.CausalLM"
        )
    return model


def _short_names(model: nn.Module) -> dict[str, str]:
    """Module name -> short projection name(s), for error messages (GPT-2's ``c_attn`` -> ``q/k/v``)."""
    adapter = ModelAdapter(model)
    names: dict[str, list[str]] = {}
    for proj in adapter.all_projections():
        names.setdefault(adapter.module_name(proj), []).append(proj.name)
    return {module: "/".join(parts) for module, parts in names.items()}


def _save_adapter(peft_model: nn.Module, adapter_dir: str) -> None:
    """peft ``save_pretrained`` into a temp dir next to the target, then rename: never a half-written adapter."""
    _check_adapter_dir(adapter_dir)
    with atomic_directory(adapter_dir) as tmp:
        peft_model.save_pretrained(tmp)


# -- argument checks --------------------------------------------------------------------------------------
def _check_rank(r: int) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r}; must be an int >= 1")
    return r


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r}; must be a number > 0")
    return float(alpha)


def _check_dropout(dropout: float) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r}; must be a number in [0, 1)")
    return float(dropout)


def _check_targets(targets: list[str] | None) -> list[str] | None:
    if targets is None:
        return None
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets={targets!r}; use None (every pruned projection) or a non-empty list of names")
    for item in targets:
        if not isinstance(item, str) or (re.fullmatch(r"\w+", item) and item not in CANONICAL_NAMES):
            raise ValueError(
                f"targets item {item!r}; allowed short names: {list(CANONICAL_NAMES)}, or a regular expression "
                r"over module names such as 'model\.layers\.0\.self_attn\.q_proj'"
            )
        try:
            re.compile(item)
        except re.error as err:
            raise ValueError(f"targets item {item!r} is not a valid regular expression: {err}") from None
    return list(targets)


def _check_adapter_dir(adapter_dir: str) -> pathlib.Path:
    path = pathlib.Path(adapter_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"adapter_dir={adapter_dir!r} already exists and is not empty; choose a new directory")
    return path
