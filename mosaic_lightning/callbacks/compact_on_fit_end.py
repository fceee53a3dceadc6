"""``CompactOnFitEnd``: at fit end, physically remove the units ``MosaicPruning`` pruned, and optionally save."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..compact import compact_model
from ..export import check_export_dir, save_pruned
from .mosaic_pruning import MosaicPruning, causal_lm


class CompactOnFitEnd(L.Callback):
    """Shrink the model at fit end (structured part of composite pruning) and save it as an HF directory.

    Args:
        export_dir: where to save (safetensors + config + ``pruning_report.json``); None = compact only.
        compress: also store the unstructured zeros compactly (bitmask + values; load with ``load_pruned``).
    """

    def __init__(self, export_dir: str | None = None, compress: bool = False) -> None:
        super().__init__()
        if export_dir is not None:
            check_export_dir(export_dir)
        self.export_dir = export_dir
        self.compress = compress

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pruning = next((cb for cb in trainer.callbacks if isinstance(cb, MosaicPruning)), None)
        if pruning is None or pruning.masks is None:
            raise RuntimeError("CompactOnFitEnd needs a MosaicPruning callback that has pruned the model")
        model = causal_lm(pl_module)
        pruning.masks.apply_(model)
        compact_model(model, pruning.structure)
        pruning.compacted = True
        rank_zero_info(f"compacted: {sum(p.numel() for p in model.parameters()):,} parameters")
        if self.export_dir is not None and trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            save_pruned(model, tokenizer, self.export_dir, pruning.report, compress=self.compress)
