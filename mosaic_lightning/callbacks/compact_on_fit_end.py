"""``CompactOnFitEnd``: at fit end, physically remove the units ``MosaicPruning`` pruned, and optionally save."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..core.consolidate import consolidated_copy
from ..core.report import PruningReport
from ..core.zero import deepspeed_engine
from ..export.compact import compact_model
from ..export.save import check_export_dir, save_pruned
from ..trainer_access import causal_lm, find_callback
from .mosaic_pruning import MosaicPruning


class CompactOnFitEnd(L.Callback):
    """Shrink the model at fit end (structured part of composite pruning) and save it as an HF directory.

    On one device and under DDP the trained model itself is compacted in place (every rank), and rank 0 saves it.
    Under DeepSpeed the engine owns the (ZeRO-3: partitioned) model, so the pruned weights are consolidated on rank
    0's CPU one module at a time (any LoRA adapter merged keeping sparsity), and that copy is compacted and saved:
    the same HF directory as a single-process run. The compacted model is ``self.model`` afterwards (None on
    the other ranks under DeepSpeed).

    Args:
        export_dir: where to save (safetensors + config + ``pruning_report.json``); None = compact only.
        compress: write compressed-tensors' bitmask format (the zeros cost one bit; load with ``load_pruned``).
    """

    def __init__(self, export_dir: str | None = None, compress: bool = False) -> None:
        super().__init__()
        if export_dir is not None:
            check_export_dir(export_dir)
        self.export_dir = export_dir
        self.compress = compress
        self.model: nn.Module | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pruning = find_callback(trainer, MosaicPruning)
        if pruning is None or pruning.masks is None:
            raise RuntimeError("CompactOnFitEnd needs a MosaicPruning callback that has pruned the model")
        self.model = final_model(trainer, pl_module, pruning)
        if self.export_dir is not None and trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            save_pruned(self.model, tokenizer, self.export_dir, pruning.report, compress=self.compress)


def final_model(
    trainer: L.Trainer, pl_module: L.LightningModule, pruning: MosaicPruning, probe: torch.Tensor | None = None
) -> nn.Module | None:
    """The pruned model with its removed units cut out, ready to save: the live model compacted in place, or under
    DeepSpeed a copy consolidated on rank 0 (None on the other ranks). Every rank must call it.

    With a ``probe`` batch of ``input_ids``, the largest logit change that compaction caused is recorded in the
    report (removed units are all-zero, so it should be float noise).
    """
    live = deepspeed_engine(trainer) is None
    model = causal_lm(pl_module)
    if not live:  # the engine owns the (partitioned) model: consolidate a plain copy, one module at a time
        model = consolidated_copy(model, pruning.masks, keep=trainer.is_global_zero)
    if model is None or not pruning.structure or (live and pruning.compacted):
        return model
    if live:
        pruning.masks.enforce_(model)
    _compact_and_record(model, pruning.structure, pruning.report, probe)
    if live:
        pruning.mark_compacted(sum(p.numel() for p in model.parameters()))
    return model


@torch.no_grad()
def _compact_and_record(model: nn.Module, structure: dict, report: PruningReport | None, probe) -> None:
    params_before = sum(p.numel() for p in model.parameters())
    if probe is not None:
        model.eval()
        probe = probe.to(model.device)
        before = model(input_ids=probe, use_cache=False).logits
    compact_model(model, structure)
    params_after = sum(p.numel() for p in model.parameters())
    rank_zero_info(f"compacted {params_before:,} -> {params_after:,} parameters")
    if report is None:
        return
    report.metrics.update(params_before_compaction=params_before, params_after_compaction=params_after)
    if probe is not None:
        difference = (model(input_ids=probe, use_cache=False).logits - before).abs().max().item()
        report.metrics["compaction_max_logit_difference"] = difference
