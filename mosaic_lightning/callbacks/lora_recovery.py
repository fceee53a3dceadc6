"""``LoRARecovery``: after ``MosaicPruning`` prunes one-shot, train LoRA adapters on the pruned projections, then
merge them without regrowing a single pruned weight.

Why LoRA: recovery then trains a few parameters per projection while the pruned base weights stay frozen, so their
zeros cannot move during training. Why a masked merge: a plain merge ``W + scale·BA`` is dense and would undo the
pruning; ``W + mask ⊙ (scale·BA)`` keeps every pruned weight (structured units included) at exactly zero. Since
pruned entries of ``W`` are already zero, that is a plain merge followed by re-applying the pruning masks.

Why a masked update while training (``masked_update=True``, the default): peft's forward adds the whole ``scale·BA``,
so the adapter learns an update that the sparsity-keeping merge then cuts wherever the mask is zero; at 70% that
discarded much of what LoRA had learnt (see bench/RESULTS.md, section 'Budgeted recovery at 70%, 80% and 90%').
Trained as ``x (W + mask ⊙ scale·BA)^T`` instead, the adapter learns only what the merge keeps, and the merged model
is the trained one. The price: the update is formed as a weight-sized tensor per projection (``B A`` from the adapter
modules applied to an identity, so ZeRO-3's hooks still gather them), one dense matmul more per projection and a
weight-sized tensor per projection held for the backward pass; ``masked_update=False`` is peft's low-rank forward.

Lifecycle (the same on one device, DDP and DeepSpeed ZeRO-2/3):

* attach: in ``setup``, before the strategy wraps the model and builds the optimizer, so DDP's gradient
  reduction and DeepSpeed's partitions and fp32 masters cover the adapter. The base is frozen and LoRA goes on
  every projection ``MosaicPruning`` is configured to prune (its ``targets``/``exclude``). ``MosaicPruning`` then
  prunes at fit start through the wrapper: ``B = 0`` at init, so calibration sees exactly the base model, and
  :func:`~mosaic_lightning.core.masks.canonical_name` maps the peft parameter names back to the HF ones. A module that
  loads its model in ``configure_model`` (as :class:`~mosaic_lightning.CausalLM` does) gets it called here, in the
  strategy's init contexts; Lightning requires that hook to be idempotent, so its own call later is a no-op.
* detach: in ``on_train_end`` (``on_fit_end`` when the loop never ran, e.g. ``max_steps=0``): save the adapter
  (optional), then merge it keeping sparsity, one LoRA layer at a time (gathered under ZeRO-3). On one device
  and DDP the wrapper is unloaded, so ``on_fit_end`` callbacks and the CLI's export see the plain HF model. Under
  DeepSpeed the engine keeps the wrapper (its layers are merged and bypass the adapter); exports consolidate the
  plain model from it (:func:`~mosaic_lightning.core.consolidate.consolidated_copy`).
* checkpoints: the adapter is part of the module while training, so its weights (and under DeepSpeed its
  partitions and optimizer state) travel in the module's checkpoint; a resumed run attaches the adapter in
  ``setup`` before Lightning restores the weights.
"""

from __future__ import annotations

import re

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..core.adapters import CANONICAL_NAMES, ModelAdapter
from ..core.masks import MaskStore, canonical_name
from ..core.zero import deepspeed_engine, full_shape, gathered_params
from ..export.save import atomic_directory, check_export_dir
from ..trainer_access import causal_lm, find_callback
from .mosaic_pruning import MosaicPruning, build_model_now

_MODEL_ATTR = "model"  # where the LightningModule keeps the HF model; the checkpoint keys start with it


class LoRARecovery(L.Callback):
    """Recover quality after one-shot pruning with LoRA adapters that are merged back without losing sparsity.

    Any order in ``trainer.callbacks`` works (see the module docstring). The LightningModule must keep its
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
        masked_update: train the adapter's update through the pruning mask, so the merge keeps all of it (see the
            module docstring); False: peft's cheaper low-rank forward, whose update the merge then cuts.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        targets: list[str] | None = None,
        adapter_dir: str | None = None,
        merge: bool = True,
        masked_update: bool = True,
    ) -> None:
        super().__init__()
        self.r = _check_rank(r)
        self.alpha = _check_alpha(alpha)
        self.dropout = _check_dropout(dropout)
        self.targets = _check_targets(targets)
        if adapter_dir is not None:
            check_export_dir(adapter_dir, field="adapter_dir")
        self.adapter_dir = adapter_dir
        if not isinstance(merge, bool):
            raise TypeError(f"merge={merge!r}; allowed values: True, False")
        self.merge = merge
        if not isinstance(masked_update, bool):
            raise TypeError(f"masked_update={masked_update!r}; allowed values: True, False")
        self.masked_update = masked_update
        self.attached = False
        self.merged = False
        self._trainable: dict[str, bool] = {}  # base requires_grad flags, restored after unloading
        self._peft_model: nn.Module | None = None  # while attached
        self._finished = False  # adapter saved / merged for this fit (on_train_end and on_fit_end both call it)

    # -- loop events ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        pruning = _find_pruning(trainer)
        if self.adapter_dir is not None:
            check_export_dir(self.adapter_dir, field="adapter_dir")
        self._finished = False
        if not self.attached:  # else merge=False in an earlier fit: keep training the same adapter
            build_model_now(trainer, pl_module)
            self._attach(pl_module, pruning.config.targets, pruning.config.exclude)
            if self.masked_update:
                _train_through_masks(self._peft_model, pruning)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)  # no-op unless the training loop was skipped

    # -- attach / detach --------------------------------------------------------------------------------
    def _attach(self, pl_module: L.LightningModule, pruned: list[str] | None, excluded: list[str]) -> None:
        """Freeze the base, wrap it with LoRA on the projections to be pruned, train only the adapter."""
        from peft import LoraConfig, get_peft_model

        model = _hf_model(pl_module)
        modules = self._lora_modules(model, pruned, excluded)
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
        setattr(pl_module, _MODEL_ATTR, peft_model)
        self._peft_model = peft_model
        self.attached, self.merged, self._finished = True, False, False
        trainable = sum(_numel(p) for p in peft_model.parameters() if p.requires_grad)
        rank_zero_info(f"LoRARecovery: r={self.r} on {len(modules)} projections, {trainable:,} trainable parameters")

    def _lora_modules(self, model: nn.Module, pruned: list[str] | None, excluded: list[str]) -> list[str]:
        """Module names to adapt; each must be one MosaicPruning prunes, or the merge could not keep its zeros."""
        adapter = ModelAdapter(model, targets=pruned, exclude=excluded)
        prunable = sorted({adapter.module_name(p) for p in adapter.all_projections()})
        if self.targets is None:
            return prunable
        adapter = ModelAdapter(model, targets=self.targets)
        chosen = sorted({adapter.module_name(p) for p in adapter.all_projections()})
        missing = [m for m in chosen if m not in set(prunable)]
        if missing:
            short = _short_names(model)
            raise ValueError(
                f"targets={self.targets!r} selects projections MosaicPruning does not prune: "
                f"{sorted({short.get(m, m) for m in missing})} (e.g. {missing[0]!r}); pruned projections: "
                f"{sorted({short.get(m, m) for m in prunable})} ({len(prunable)} modules). LoRA recovery adapts "
                "pruned projections only; choose targets among those, or None for all of them"
            )
        return chosen

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the adapter (optional), then merge it keeping sparsity and unload (optional)."""
        peft_model = self._peft_model
        if peft_model is None or self._finished:
            return
        self._finished = True
        if self.adapter_dir is not None:
            _save_adapter(peft_model, self.adapter_dir, trainer.is_global_zero)
            rank_zero_info(f"LoRARecovery: saved the adapter to {self.adapter_dir}")
        if not self.merge:
            return
        pruning = _find_pruning(trainer)
        if pruning.masks is None:
            raise RuntimeError(_NO_MASKS)
        sharded = deepspeed_engine(trainer) is not None  # the engine owns the module tree: merge, keep the wrapper
        model = merge_keeping_sparsity(peft_model, pruning.masks, unload=not sharded)
        self.merged = True
        if pruning.report is not None:
            pruning.report.metrics.update(lora_rank=self.r, lora_recovery_steps=trainer.global_step)
        if sharded:
            return
        for name, param in model.named_parameters():
            param.requires_grad_(self._trainable.get(name, param.requires_grad))
        setattr(pl_module, _MODEL_ATTR, model)
        self._peft_model = None
        self.attached = False

    # -- checkpointing: the adapter's weights are module weights; only the settings are checked here -------
    def state_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "targets": self.targets, "masked_update": self.masked_update}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = {"masked_update": False, **state_dict}  # checkpoints from before the option trained unmasked
        for name in ("r", "alpha", "targets", "masked_update"):
            if state_dict.get(name) != getattr(self, name):
                raise ValueError(
                    f"LoRARecovery {name}={getattr(self, name)!r} differs from the checkpoint's "
                    f"{name}={state_dict.get(name)!r}; resume with the same adapter settings"
                )


_NO_MASKS = (
    "LoRARecovery: MosaicPruning has no masks at fit start. LoRA recovery needs a one-shot prune at fit start "
    "(schedule=OneShot(), the default); Gradual, OneShot(at_step=N) and ADMM schedules prune later"
)


# -- helpers ----------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_keeping_sparsity(peft_model: nn.Module, masks: MaskStore, unload: bool = True) -> nn.Module:
    """Merge LoRA into the base weights as ``W + mask ⊙ (scale·B A)``; return the unloaded HF model (or, with
    ``unload=False``, the wrapper with every LoRA layer merged, so its forward is the merged model's).

    Pruned entries of ``W`` are zero, so this is peft's merge (Conv1D layout, dtype casts, adapter scaling) followed
    by re-applying the masks, one LoRA layer at a time; under ZeRO-3 only that layer is gathered.
    """
    from peft.tuners.lora import LoraLayer

    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or layer.merged:
            continue
        weight_name = canonical_name(f"{name}.weight")
        if weight_name not in masks:
            raise ValueError(f"{weight_name} carries a LoRA adapter but no pruning mask: its merge would be dense")
        with gathered_params(layer.parameters(), modify=True):
            layer.merge()
            weight = layer.get_base_layer().weight
            weight.data.masked_fill_(~masks.masks[weight_name].to(weight.device), 0)
    return peft_model.unload() if unload else peft_model


def _train_through_masks(peft_model: nn.Module, pruning: MosaicPruning) -> None:
    """Every LoRA layer's forward becomes ``base(x) + dropout(x) (mask ⊙ scale·BA)^T`` once ``pruning`` holds
    masks (before that, during calibration, ``B = 0``: peft's own forward, which adds exactly zero)."""
    from peft.tuners.lora import LoraLayer

    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer):
            layer.forward = _masked_forward(layer, layer.forward, canonical_name(f"{name}.weight"), pruning)


def _masked_forward(layer: nn.Module, peft_forward, weight_name: str, pruning: MosaicPruning):
    linear = isinstance(layer.get_base_layer(), nn.Linear)  # else GPT-2's Conv1D, whose weight is [in, out]
    on_device: dict[torch.device, torch.Tensor] = {}

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if pruning.masks is None or layer.disable_adapters or layer.merged:
            return peft_forward(x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)
        if x.device not in on_device:  # the mask as [in, out], the layout x @ update needs
            keep = pruning.masks.masks[weight_name].to(x.device)
            on_device[x.device] = keep.t() if linear else keep
        keep = on_device[x.device]
        for adapter in [a for a in layer.active_adapters if a in layer.lora_A]:
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            eye = torch.eye(lora_a.in_features, dtype=lora_a.weight.dtype, device=x.device)  # as peft casts x
            update = lora_b(lora_a(eye)) * layer.scaling[adapter]  # (scale·BA)^T, [in, out]
            lora_x = layer.lora_dropout[adapter](x).to(update.dtype)
            result = result + (lora_x @ (update * keep)).to(result.dtype)
        return result

    return forward


def _is_lora_key(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _numel(param: torch.Tensor) -> int:
    return full_shape(param).numel()


def _find_pruning(trainer: L.Trainer) -> MosaicPruning:
    pruning = find_callback(trainer, MosaicPruning)
    if pruning is None:
        raise RuntimeError("LoRARecovery needs a MosaicPruning callback in trainer.callbacks (it adapts its masks)")
    if not getattr(pruning.schedule, "prunes_at_fit_start", False):
        raise RuntimeError(f"{_NO_MASKS}; got schedule={type(pruning.schedule).__name__}")
    return pruning


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


def _save_adapter(peft_model: nn.Module, adapter_dir: str, writer: bool) -> None:
    """peft ``save_pretrained`` into a temp dir next to the target, then rename: never a half-written adapter.
    Every rank joins the gather of the adapter's ZeRO-3 partitions (only the adapter); ``writer`` writes."""
    with gathered_params(p for n, p in peft_model.named_parameters() if _is_lora_key(n)):
        if writer:
            with atomic_directory(adapter_dir, field="adapter_dir") as tmp:
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
