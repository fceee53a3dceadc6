"""Prune a model larger than memory: read each decoder block from the source shards, prune it, write it out.

:func:`prune_streamed` is what ``python train.py fit ... --stream true`` runs. Host memory holds the embeddings,
final norm and output embedding, one block, and one block's calibration activations (plus the evaluation
windows' hidden states, when evaluating), whatever the depth. The engine is the in-memory one
(:func:`~mosaic_lightning.pruning.engine.prune_model`) with a
:class:`~mosaic_lightning.streaming.shards.StreamedBlocks` residency, so masks and weights are bit-identical to an
in-memory run with the same settings.

Resumable: the export is written into ``.<export_dir name>.partial`` beside ``export_dir``; after every block
its shard, the next block's calibration inputs and the report rows so far are saved there (``progress.json``
last, so a kill between files leaves the previous block's state). The same command again continues after the
last block saved, when its settings and calibration tokens are the same (else it refuses, naming the folder).
The plan (every projection's count, from the allocation's profile of the dense model: owl, mosaic) is saved
with the first block, so a resumed run does not repeat the profile pass. When every block is done the index,
config, tokenizer and report are added and the folder is renamed to ``export_dir``.

Composite and structured pruning (``structured_fraction > 0``, StructPrune) are compacted block by block: a block
that lost whole MLP channels or heads is written physically smaller (:class:`~mosaic_lightning.streaming.shards.
StreamedBlocks`), and at the end the config records every layer's sizes as :func:`~mosaic_lightning.compact_model`
does, so the export is the one the in-memory path writes (plain ``from_pretrained`` where one size fits all
layers, else :func:`~mosaic_lightning.load_pruned`). The removed units are saved with each block; a resumed run
compacts the skeleton's finished blocks from them before it continues.

Not streamed (refused before any work, in :func:`check_streamable`): training steps, allocations that need the
whole model at once (MSP's gradients), lm-eval tasks, the compressed export, multi-process runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from ..calibration.capture import blocks_replaced, capture_block_inputs, run_block
from ..core.adapters import ModelAdapter
from ..core.report import ProjectionReport, PruningReport, peak_memory, reset_peak_memory
from ..core.residency import move_tensors
from ..core.structure import UnitGroup, unit_groups
from ..evaluation.perplexity import score_hidden
from ..export.compact import layer_shapes, record_layer_shapes, remove_units, shapes_after
from ..export.save import check_export_dir, write_beside_weights
from ..pruning.config import PruningConfig
from ..pruning.engine import Plan, StartPoint, prune_model
from .shards import SafetensorsSource, ShardWriter, StreamedBlocks, StreamedModel, meta_skeleton

PROGRESS_NAME = "progress.json"


def partial_dir(export_dir: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(export_dir).absolute()
    return path.with_name(f".{path.name}.partial")


def check_streamable(config: PruningConfig, **options) -> None:
    """Refuse, naming the option, what a streamed run cannot do (``options``: name -> whether it is asked)."""
    if getattr(config.allocation, "needs_whole_model", False):
        raise ValueError(
            f"--stream true: allocation {config.allocation.label!r} needs the whole model in memory (gradients "
            "through every block); choose uniform, owl or mosaic, or run without --stream"
        )
    for name, asked in options.items():
        if asked:
            raise ValueError(f"--stream true cannot be combined with {name}; it prunes one-shot, one process")


class _Progress:
    """The partial export's state between blocks (``progress.json`` plus the next block's activations)."""

    def __init__(self, directory: pathlib.Path, fingerprint: str) -> None:
        self.directory, self.fingerprint = directory, fingerprint
        self.state: dict = {"fingerprint": fingerprint, "next_layer": 0, "rows": [], "activations": None}
        path = directory / PROGRESS_NAME
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise FileExistsError(
                    f"{directory} holds a streamed run made with other settings or calibration data; delete it to "
                    "start over, or run the same command as before to continue it"
                )
            self.state = saved

    def start_point(self, groups: list[UnitGroup]) -> StartPoint:
        """The saved state; ``groups``: the plan's unit groups (not saved: they follow from the model and config)."""
        hidden = None
        if self.state["activations"]:
            from safetensors.torch import load_file

            saved = load_file(self.directory / self.state["activations"])
            hidden = [saved[f"hidden.{i}"] for i in range(len(saved))]
        rows = [ProjectionReport(**row) for row in self.state["rows"]]
        plan = Plan(**self.state["plan"], unit_groups=groups) if self.state.get("plan") else None
        return StartPoint(self.state["next_layer"], hidden, rows, plan, self.state.get("structure", {}))

    def block_saved(
        self, layer: int, next_hidden: list[torch.Tensor] | None, rows: list[ProjectionReport], plan: Plan,
        structure: dict[str, list[int]],
    ) -> None:  # fmt: skip
        from safetensors.torch import save_file

        old = self.state["activations"]
        name = None
        if next_hidden is not None:
            name = f"activations-{layer + 1:05d}.safetensors"
            save_file({f"hidden.{i}": h.detach().cpu().contiguous() for i, h in enumerate(next_hidden)},
                      self.directory / name)  # fmt: skip
        self.state.update(next_layer=layer + 1, rows=[dataclasses.asdict(r) for r in rows], activations=name,
                          plan=plan.to_dict(), structure=structure)  # fmt: skip
        self.save()
        if old and old != name:
            (self.directory / old).unlink(missing_ok=True)

    def save(self) -> None:
        path = self.directory / PROGRESS_NAME
        path.with_suffix(".tmp").write_text(json.dumps(self.state))
        os.replace(path.with_suffix(".tmp"), path)

    def finish(self) -> None:
        if self.state["activations"]:
            (self.directory / self.state["activations"]).unlink(missing_ok=True)
        (self.directory / PROGRESS_NAME).unlink()


def fingerprint(settings: dict, batches: Sequence[torch.Tensor], eval_batches: Sequence[torch.Tensor]) -> str:
    """What a resumed run must share with the first: its settings and every calibration and evaluation token."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for ids in (*batches, *eval_batches):
        digest.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def prune_streamed(
    source_dir: str | os.PathLike,
    dtype: torch.dtype,
    config: PruningConfig,
    batches: list[torch.Tensor],
    export_dir: str | os.PathLike,
    eval_batches: list[torch.Tensor] | None = None,
    tokenizer=None,
    device: str | None = None,
    progress: bool = True,
    extra_files: dict[str, str] | None = None,
) -> PruningReport:
    """Prune ``source_dir``'s model block by block from its shards into ``export_dir`` (resumable; see the module
    docstring). ``eval_batches``: dense and pruned perplexity, each one streamed pass. A resumed run must have the
    same source, dtype, pruning config, device and calibration/evaluation tokens (checked). The other export
    files are :func:`~mosaic_lightning.export.save.save_pruned`'s, ``extra_files`` (e.g. the resolved recipe)
    included."""
    export_dir = check_export_dir(export_dir)  # a link to an empty directory: that directory
    check_streamable(config)
    source = SafetensorsSource(source_dir)
    model = meta_skeleton(source_dir, dtype)
    adapter = ModelAdapter(model, targets=config.targets, exclude=config.exclude)
    streamed = StreamedModel(model, adapter, source)
    work = partial_dir(export_dir)
    work.mkdir(exist_ok=True)
    run = {"source": str(pathlib.Path(source_dir).absolute()), "dtype": str(dtype), "config": config.to_dict(),
           "device": device}  # fmt: skip
    state = _Progress(work, fingerprint(run, batches, eval_batches or []))
    groups = unit_groups(adapter, config.structured_units) if config.structured else []
    full_shapes, params_before = layer_shapes(adapter), sum(p.numel() for p in model.parameters())
    start = state.start_point(groups)
    remove_units(adapter, start.structure)  # the finished blocks as they were written: compacted
    io: dict[str, dict[str, int]] = state.state.setdefault("io_bytes", {})
    peaks: dict[str, float] = state.state.setdefault("peak_memory_mb", {})
    streamed.load_resident()
    if eval_batches and "ppl_dense" not in state.state:
        with _phase("dense_eval", io, peaks, source):
            state.state["ppl_dense"] = streamed_perplexity(streamed, eval_batches, device, "dense perplexity", progress)
        state.save()
    writer = ShardWriter(work, adapter.num_layers + 1)
    residency = StreamedBlocks(streamed, writer, device, on_saved=state.block_saved)
    with _phase("prune", io, peaks, source, writer):
        outcome = prune_model(model, batches, config, adapter, progress, residency, start)
        writer.write(0, streamed.resident_state())
        writer.write_index([streamed.resident_names, *streamed.block_names])
    report = outcome.report
    if report.structure:
        record_layer_shapes(model.config, shapes_after(full_shapes, report.structure))
        report.metrics.update(params_before_compaction=params_before,
                              params_after_compaction=sum(p.numel() for p in model.parameters()))  # fmt: skip
    if start.layer:
        report.calibration["resumed_at_block"] = start.layer
    if eval_batches:
        report.metrics["ppl_dense"] = state.state["ppl_dense"]
        pruned = StreamedModel(model, adapter, SafetensorsSource(work))
        with _phase("pruned_eval", io, peaks, pruned.source):
            report.metrics["ppl_pruned"] = streamed_perplexity(pruned, eval_batches, device, "pruned perplexity",
                                                               progress)  # fmt: skip
    report.io_bytes, report.peak_memory_mb = io, {**peaks, **report.peak_memory_mb}
    write_beside_weights(model, tokenizer, work, report, extra_files, run["source"])
    state.finish()
    _publish(work, pathlib.Path(export_dir).absolute())
    return report


def _publish(work: pathlib.Path, export_dir: pathlib.Path) -> None:
    """Rename the finished partial folder to ``export_dir`` (which, if it exists, is empty: checked at the start)."""
    if export_dir.exists():
        export_dir.rmdir()
    os.replace(work, export_dir)


class _phase:
    """Peak host RSS (reset at the start, Linux) and bytes read/written over one phase, into ``io`` / ``peaks``."""

    def __init__(self, name, io, peaks, source: SafetensorsSource, writer: ShardWriter | None = None) -> None:
        self.name, self.io, self.peaks, self.source, self.writer = name, io, peaks, source, writer

    def __enter__(self):
        reset_peak_memory()
        self.read0, self.written0, self.clock = self.source.bytes_read, self._written(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        self.peaks.update(peak_memory(self.name))
        self.peaks[f"{self.name}_seconds"] = time.perf_counter() - self.clock
        self.io[self.name] = {"read": self.source.bytes_read - self.read0, "written": self._written() - self.written0}

    def _written(self) -> int:
        return self.writer.bytes_written if self.writer is not None else 0


@torch.no_grad()
def streamed_perplexity(
    streamed: StreamedModel, batches: Sequence, device: str | None, desc: str, progress: bool = True
) -> float:
    """Perplexity with one block in memory at a time: every window's hidden states go through block 0, then
    block 1, ...; the model's own tail (final norm) runs on them with the blocks stood in for, and the loss is
    scored a chunk of positions at a time (:func:`~mosaic_lightning.evaluation.perplexity.score_hidden`)."""
    model, adapter = streamed.model, streamed.adapter
    ids = [b["input_ids"] if isinstance(b, dict) else b for b in batches]
    target = torch.device(device or "cpu")
    inputs = capture_block_inputs(model, adapter.block_list, ids)
    inputs.by_layer = move_tensors(inputs.by_layer, lambda t: t.to(target))
    hidden = [h.to(target) for h in inputs.hidden]
    for layer in tqdm(range(adapter.num_layers), desc=desc, disable=not progress):
        streamed.load_block(layer, target)
        try:
            inputs.enter(layer)
            inputs.hidden = hidden
            hidden = run_block(adapter.blocks[layer], inputs)
        finally:
            streamed.free_block(layer)
    metric = Perplexity()
    for final, window in zip(hidden, ids, strict=True):
        score_hidden(model, metric, _through_tail(model, adapter, final.cpu(), window), window)
    return float(metric.compute())


def _through_tail(model: nn.Module, adapter: ModelAdapter, final: torch.Tensor, input_ids: torch.Tensor):
    """The base model's output (after its final norm) for the last block's output ``final``: a forward whose
    first block returns ``final`` and whose other blocks pass it on."""
    stand_ins = [_Constant(final) if layer == 0 else _Identity() for layer in range(adapter.num_layers)]
    with blocks_replaced(adapter.block_list, stand_ins):
        return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


class _Constant(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.value


class _Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs) -> torch.Tensor:
        return hidden_states
