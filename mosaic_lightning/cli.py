"""``MosaicCLI``: LightningCLI with the pruning callback as a top-level group, evaluation and export.

``python train.py fit --config recipes/mosaic-50.yaml --pruning.sparsity 0.7 --export_dir out/`` evaluates
dense perplexity, prunes at fit start, trains for ``trainer.max_steps`` (0 for one-shot recipes), evaluates
again and writes a Hugging Face directory with ``pruning_report.json``.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .callbacks import CompactOnFitEnd, MosaicPruning
from .callbacks.compact_on_fit_end import final_model
from .evaluation import perplexity
from .export import check_export_dir, save_pruned
from .lit import CausalLM, TextDataModule
from .trainer_access import causal_lm, find_callback


class MosaicCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", CausalLM)
        kwargs.setdefault("datamodule_class", TextDataModule)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "yaml"})  # yaml.safe_load underneath
        # The resolved config goes into the export as recipe.yaml instead of the working directory, where a
        # second run would refuse to start (or overwrite the first run's file).
        kwargs.setdefault("save_config_callback", None)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MosaicPruning, "pruning")
        parser.add_argument(
            "--export_dir", type=str | None, default=None, help="where to save the pruned HF model"
        )
        parser.add_argument("--evaluate", type=bool, default=True, help="perplexity before and after pruning")
        parser.add_argument(
            "--compress_export", type=bool, default=False, help="store unstructured zeros as bitmask + values"
        )
        parser.link_arguments("model.pretrained", "data.tokenizer")

    def _pruning_callback(self) -> MosaicPruning:
        return find_callback(self.trainer, MosaicPruning)

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.export_dir:
            check_export_dir(config.export_dir)
        self._clock = time.perf_counter()
        self.datamodule.setup("fit")
        self._metrics: dict[str, float] = {}
        if config.evaluate:  # first at fit start: the strategy is set up (ranks share the batches), nothing pruned
            self.trainer.callbacks.insert(0, _DensePerplexity(self))

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        callback = self._pruning_callback()
        report = callback.report
        if report is None:
            raise RuntimeError(
                "pruning did not run: the schedule never pruned (check its steps against trainer.max_steps), or "
                "ckpt_path points to a checkpoint written before this version kept the pruning report"
            )
        if config.evaluate:
            self._metrics["ppl_pruned"] = self._perplexity("pruned perplexity")
        report.metrics.update(self._metrics)
        report.timings["total"] = time.perf_counter() - self._clock
        report.record_peak_memory("total")
        for logger in self.trainer.loggers:
            logger.log_metrics(self._metrics, step=self.trainer.global_step)
            logger.save()
        rank_zero_info(report.summary())
        model = self._final_model(callback)
        if config.export_dir and self.trainer.is_global_zero:
            path = save_pruned(model, self.datamodule.tokenizer, config.export_dir, report, config.compress_export)
            rank_zero_info(f"saved pruned model and pruning_report.json to {path}")

    def _final_model(self, callback: MosaicPruning) -> torch.nn.Module | None:
        """The model to export, compacted (under DeepSpeed consolidated on rank 0; None on the other ranks)."""
        compactor = find_callback(self.trainer, CompactOnFitEnd)
        if compactor is not None:  # it already compacted (and consolidated) at fit end
            return compactor.model
        probe = next(iter(self.datamodule.val_dataloader()))["input_ids"][:1]
        return final_model(self.trainer, self.model, callback, probe)

    def _perplexity(self, desc: str) -> float:
        clock = time.perf_counter()
        distributed = self.trainer.world_size > 1  # every rank gets here: share the batches
        value = perplexity(causal_lm(self.model), self.datamodule.val_dataloader(), desc=desc, distributed=distributed)
        self._metrics[f"{desc.split()[0]}_eval_s"] = time.perf_counter() - clock
        return value


class _DensePerplexity(Callback):
    """Dense perplexity at fit start, before ``MosaicPruning`` prunes: the strategy has set the model up by then
    (ZeRO-3: partitioned, forwards gather), and every rank scores its share of the batches.

    The value travels in checkpoints: a resumed run holds pruned weights at fit start, so it reports the dense
    perplexity its first run measured instead of scoring the pruned model as dense.
    """

    def __init__(self, cli: MosaicCLI) -> None:
        self.cli = cli

    def on_fit_start(self, trainer, pl_module) -> None:
        if "ppl_dense" in self.cli._metrics:  # restored from the checkpoint
            return
        if trainer.ckpt_path is not None and not trainer.strategy.restore_checkpoint_after_setup:
            rank_zero_warn("ppl_dense not measured: the checkpoint holds none (its run had evaluate=false) and the "
                           "model holds its resumed, pruned weights already")  # fmt: skip
            return
        self.cli._metrics["ppl_dense"] = self.cli._perplexity("dense perplexity")

    def state_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.cli._metrics.items() if k in ("ppl_dense", "dense_eval_s")}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.cli._metrics.update(state_dict)


def main() -> None:
    MosaicCLI()
