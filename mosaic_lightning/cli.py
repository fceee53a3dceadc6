"""``MosaicCLI``: LightningCLI with the pruning callback as a top-level group, evaluation and export.

``python train.py fit --config recipes/mosaic-50.yaml --pruning.sparsity 0.7 --export_dir out/`` evaluates
dense perplexity, prunes at fit start, trains for ``trainer.max_steps`` (0 for one-shot recipes), evaluates
again and writes a Hugging Face directory with ``pruning_report.json``.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .callbacks import CompactOnFitEnd, MosaicPruning
from .callbacks.compact_on_fit_end import final_model
from .callbacks.zero_shot import ZeroShotAccuracy
from .console import TRACEBACK_ENV, one_line, quiet_dependencies, reported_errors, run_summary, weight_bytes
from .core.assets import local_model_dir
from .evaluation.perplexity import perplexity
from .evaluation.zero_shot import check_task_options
from .export.checkpoints import check_checkpoint
from .export.save import check_export_dir, save_pruned
from .lit import CausalLM, TextDataModule
from .lit.module import DTYPES
from .shipped import listing, packaged_path, resolve_config_args
from .streaming.job import check_streamable, prune_streamed
from .trainer_access import causal_lm, find_callback

HELP_EPILOG = (
    "--config also takes a shipped recipe or config by name (e.g. --config mosaic-50 --config gpu); "
    "'mosaic-lightning recipes' lists them. Errors end in one line; MOSAIC_TRACEBACK=1 shows the traceback."
)


class ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; a bad argument ends in one line, ``error: <message>``, and exit status 2, without the
    usage of every option (``--help`` shows it; ``MOSAIC_TRACEBACK=1`` restores jsonargparse's own output)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
            return super().error(message, ex)  # inside jsonargparse's own retries it raises, as it should
        sys.stderr.write(f"error: {one_line(message)}\n")
        self.exit(2)


class MosaicCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", ArgumentParser)
        kwargs.setdefault("model_class", CausalLM)
        kwargs.setdefault("datamodule_class", TextDataModule)
        # yaml.safe_load underneath; the help says what --config takes besides a path
        epilog = {"epilog": HELP_EPILOG}
        kwargs.setdefault("parser_kwargs", {"parser_mode": "yaml", **epilog, "fit": epilog})
        # The resolved config goes into the export as recipe.yaml instead of the working directory, where a
        # second run would refuse to start (or overwrite the first run's file).
        kwargs.setdefault("save_config_callback", None)
        quiet_dependencies()
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        """Check ``ckpt_path`` right after parsing: LightningCLI loads it next (for its hyperparameters), and torch's
        errors name no argument (for an unsafe file they even advise ``weights_only=False``)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            check_checkpoint(self.config[subcommand].ckpt_path)

    def before_instantiate_classes(self) -> None:
        """One-shot runs (``trainer.max_steps`` 0) skip Lightning's model summary (nothing trains) and its "max_steps
        reached" notice; a DeepSpeed config file given as ``configs/...`` is found in the package from any
        directory; runs without DeepSpeed drop its accelerator notice."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        one_shot = trainer.get("max_steps") == 0
        if one_shot and trainer.get("enable_model_summary") is None:
            trainer.enable_model_summary = False
        strategy = trainer.get("strategy")
        init_args = strategy.get("init_args") if hasattr(strategy, "get") else None
        if init_args is not None and isinstance(init_args.get("config"), str):
            packaged = packaged_path(init_args.config)
            if packaged is not None:
                init_args.config = str(packaged)
        quiet_dependencies(one_shot=one_shot, deepspeed="deepspeed" in str(strategy).lower())

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MosaicPruning, "pruning")
        parser.add_argument("--export_dir", type=str | None, default=None, help="where to save the pruned HF model")
        parser.add_argument("--evaluate", type=bool, default=True, help="perplexity before and after pruning")
        parser.add_argument(
            "--evaluate_tasks",
            type=list[str] | str | None,
            default=None,
            help="lm-eval tasks scored before and after pruning, e.g. '[social_iqa_local]'",
        )
        parser.add_argument(
            "--evaluate_include_path",
            type=str | None,
            default=None,
            help="a folder of your own lm-eval task YAMLs (the package's tasks are always included)",
        )
        parser.add_argument("--evaluate_limit", type=int | None, default=None,
                            help="score only the first N items of each lm-eval task")  # fmt: skip
        parser.add_argument("--compress_export", type=bool, default=False,
                            help="compressed-tensors' sparse(-24)-bitmask format; read by load_pruned")  # fmt: skip
        parser.add_argument("--stream", type=bool, default=False,
                            help="read each block from the model's safetensors shards and write it out one at a "
                                 "time (models larger than memory; resumable); needs --export_dir")  # fmt: skip
        parser.link_arguments("model.pretrained", "data.tokenizer")

    def _pruning_callback(self) -> MosaicPruning:
        return find_callback(self.trainer, MosaicPruning)

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.stream:
            self._check_stream(config)
        if config.export_dir:  # a resumed streamed run writes into its partial folder: export_dir is still new
            check_export_dir(config.export_dir)
        tasks = check_task_options(config.evaluate_tasks, config.evaluate_include_path, config.evaluate_limit)
        self._zero_shot = None
        if tasks:  # names checked here, before any work; dense accuracy at fit start, before pruning
            self._zero_shot = ZeroShotAccuracy(tasks, config.evaluate_include_path, config.evaluate_limit)
            self.trainer.callbacks.insert(0, self._zero_shot)
        self._clock = time.perf_counter()
        self.datamodule.setup("fit")
        self._metrics: dict[str, float] = {}
        if config.evaluate and not config.stream:  # at fit start: strategy set up (ranks share batches), nothing pruned
            self.trainer.callbacks.insert(0, _PerplexityBeforeTraining(self))

    def fit(self, model, **kwargs) -> None:
        """``trainer.fit``, or with ``--stream true`` the streamed one-shot job (no Trainer loop: the model never
        sits in memory as a whole)."""
        if not self.config[self.subcommand].stream:
            self.trainer.fit(model, **kwargs)
            return
        self._fit_streamed()

    def _check_stream(self, config) -> None:
        """Everything a streamed run cannot do, refused before any work."""
        callback = self._pruning_callback()
        if not config.export_dir:
            raise ValueError("--stream true writes the pruned model block by block: give --export_dir")
        check_streamable(
            callback.config,
            **{
                "trainer.max_steps other than 0 (training)": self.trainer.max_steps != 0,
                "more than one process (trainer.devices, trainer.num_nodes)": self.trainer.world_size > 1,
                "--evaluate_tasks (lm-eval scores the whole model)": bool(config.evaluate_tasks),
                "--compress_export true": config.compress_export,
                "--ckpt_path (a streamed run resumes from its partial export)": bool(config.ckpt_path),
                "a schedule other than OneShot at fit start": not callback.schedule.prunes_at_fit_start,
                "--model.distill_weight > 0": self.model.hparams.distill_weight > 0,
            },
        )

    def _fit_streamed(self) -> None:
        config = self.config[self.subcommand]
        callback = self._pruning_callback()
        source = local_model_dir(self.model.hparams.pretrained)
        batches = self.datamodule.calibration_batches(callback.num_calibration_samples)
        eval_batches = [b["input_ids"] for b in self.datamodule.val_dataloader()] if config.evaluate else None
        self._streamed_report = prune_streamed(
            source, DTYPES[self.model.hparams.dtype], callback.config, batches, config.export_dir, eval_batches,
            self.datamodule.tokenizer, callback.device, progress=callback.verbose, extra_files=self._recipe_file(),
        )  # fmt: skip

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.stream:  # exported by the streamed job itself
            report = self._streamed_report
            self._log_and_summarise(report, report.metrics)
            report.metrics["weights_bytes_export"] = weight_bytes(config.export_dir)
            report.save_json(Path(config.export_dir) / "pruning_report.json")  # now with the run's total
            rank_zero_info(run_summary(report, config.export_dir))
            return
        callback = self._pruning_callback()
        report = callback.report
        if report is None:
            raise RuntimeError(
                "pruning did not run: the schedule never pruned (check its steps against trainer.max_steps), or "
                "ckpt_path points to a checkpoint written before this version kept the pruning report"
            )
        if config.evaluate:
            self._metrics["ppl_pruned"] = self._perplexity("pruned perplexity")
        model = self._final_model(callback)
        if self._zero_shot:  # on the model as exported (rank 0)
            self._zero_shot.evaluate_pruned(self.trainer, model)
            report.tasks = self._zero_shot.results
            self._metrics.update(self._zero_shot.seconds)
        logged = {**self._metrics, **(self._zero_shot.logged_metrics() if self._zero_shot else {})}
        report.metrics.update(self._metrics)
        if model is not None:
            self._record_sizes(report, model)
        self._log_and_summarise(report, logged)
        export_clock = time.perf_counter()
        if not (config.export_dir and self.trainer.is_global_zero):
            rank_zero_info(run_summary(report))
        if config.export_dir and self.trainer.is_global_zero:
            path = save_pruned(model, self.datamodule.tokenizer, config.export_dir, report, config.compress_export,
                               self._recipe_file(), base_model=config.model.pretrained)  # fmt: skip
            self._exported(report, path, export_clock)

    def _recipe_file(self) -> dict[str, str]:
        """The resolved recipe, every value included, as ``recipe.yaml`` in the export: an export says how it was
        made, and ``--config <export>/recipe.yaml`` makes it again."""
        config = self.config[self.subcommand]
        return {"recipe.yaml": self._parser(self.subcommand).dump(config, skip_none=False)}

    def _log_and_summarise(self, report, logged: dict[str, float]) -> None:
        """The run's total time and peak memory into ``report``; ``logged`` to every logger."""
        report.timings["total"] = time.perf_counter() - self._clock
        report.record_run_peak_memory()
        for logger in self.trainer.loggers:
            logger.log_metrics(logged, step=self.trainer.global_step)
            logger.save()

    @staticmethod
    def _record_sizes(report, model: torch.nn.Module) -> None:
        """Parameters of the dense and the final model, how many of the final one are zero, and the bytes a dense
        export's weights would take at the final model's dtype, into ``report.metrics`` (the summary table's
        before/after rows). The dense count is the final one plus what compaction removed, or, for a model
        compacted before training, the plan's count of the dense model."""
        params = sum(p.numel() for p in model.parameters())
        nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        report.metrics.update(params_export=params, nonzero_params_export=nonzero)
        metrics = report.metrics
        if "params_before_compaction" in metrics or "params_after_compaction" not in metrics:
            dense = params + metrics.get("params_before_compaction", 0) - metrics.get("params_after_compaction", 0)
        elif "params_dense" in metrics:
            dense = metrics["params_dense"]
        else:
            return
        report.metrics.update(params_dense=dense, weights_bytes_dense=dense * next(model.parameters()).element_size())

    def _exported(self, report, path: Path, clock: float) -> None:
        """After ``save_pruned``: its time, the weight files' size and the run's total into ``report`` and the
        export's ``pruning_report.json``; then the summary table."""
        report.timings["export"] = time.perf_counter() - clock
        report.metrics["weights_bytes_export"] = weight_bytes(path)
        report.timings["total"] = time.perf_counter() - self._clock
        report.record_run_peak_memory()
        report.save_json(Path(path) / "pruning_report.json")
        rank_zero_info(run_summary(report, path))

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


class _PerplexityBeforeTraining(Callback):
    """Dense perplexity at fit start, before ``MosaicPruning`` prunes: the strategy has set the model up by then
    (ZeRO-3: partitioned, forwards gather), and every rank scores its share of the batches.

    A run that compacts before training prunes before fit start, after any checkpoint is restored, so its dense
    perplexity is measured right before that prune, and the compacted model's (``ppl_compacted``, before any
    training) at fit start.

    The values travel in checkpoints: a resumed run holds pruned weights at fit start, so it reports the dense
    perplexity its first run measured instead of scoring the pruned model as dense.
    """

    _KEYS = ("ppl_dense", "dense_eval_s", "ppl_compacted", "compacted_eval_s")

    def __init__(self, cli: MosaicCLI) -> None:
        self.cli = cli
        self._undo_hook: Callable[[], None] = lambda: None

    def _compacts_early(self, trainer) -> bool:
        pruning = find_callback(trainer, MosaicPruning)
        return pruning is not None and pruning.compact_before_training

    def setup(self, trainer, pl_module, stage: str) -> None:
        pruning = find_callback(trainer, MosaicPruning)
        if stage == "fit" and pruning is not None:
            self._undo_hook = pruning.run_before_dense_prune(self._score_dense_before_prune)

    def _score_dense_before_prune(self, *_) -> None:
        self.cli._metrics["ppl_dense"] = self.cli._perplexity("dense perplexity")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._undo_hook()  # the prune before training is done, or was not needed (resumed)
        if self._compacts_early(trainer):
            if "ppl_compacted" in self.cli._metrics:  # restored from the checkpoint
                return
            if trainer.ckpt_path is not None:
                rank_zero_warn("ppl_compacted not measured: the checkpoint holds none (its run had evaluate=false) "
                               "and the model holds its resumed, trained weights already")  # fmt: skip
                return
            self.cli._metrics["ppl_compacted"] = self.cli._perplexity("compacted perplexity")
            return
        if "ppl_dense" in self.cli._metrics:  # restored from the checkpoint
            return
        if trainer.ckpt_path is not None and not trainer.strategy.restore_checkpoint_after_setup:
            rank_zero_warn("ppl_dense not measured: the checkpoint holds none (its run had evaluate=false) and the "
                           "model holds its resumed, pruned weights already")  # fmt: skip
            return
        self.cli._metrics["ppl_dense"] = self.cli._perplexity("dense perplexity")

    def state_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.cli._metrics.items() if k in self._KEYS}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.cli._metrics.update(state_dict)


def main(args: list[str] | None = None) -> None:
    """The ``mosaic-lightning`` command (``python train.py`` is the same): LightningCLI's subcommands, with
    ``--config`` taking a shipped recipe or config by name, and ``recipes`` listing them. An error ends in one
    line, ``error: <message>``, and exit status 1 (``MOSAIC_TRACEBACK=1`` shows the traceback)."""
    argv = sys.argv[1:] if args is None else list(args)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # args: argv, resolved
    with reported_errors():
        if argv[:1] == ["recipes"]:
            print(listing())
            return
        MosaicCLI(args=resolve_config_args(argv))
