"""Saving pruned models as Hugging Face directories, atomically: write a temp dir, then rename.

A user's existing directory is never overwritten or left half-written.
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import tempfile
from contextlib import contextmanager, suppress

from torch import nn

from ..core.report import PruningReport
from .model_card import model_card


def check_export_dir(export_dir: str | os.PathLike, field: str = "export_dir") -> pathlib.Path:
    """Fail early (before any weight changes) when the target exists and is not an empty directory, or cannot be
    created where it is (under a file, a dangling link, a read-only parent); the error names the argument ``field``.

    Returns the directory to write: ``export_dir``, or for a link to an empty directory the directory it points
    to (the export is written into it, beside it while in progress: on the target's own file system)."""
    path = pathlib.Path(export_dir)
    name = repr(str(path))
    if path.is_symlink():
        if not path.exists():
            raise FileExistsError(f"{field}={name} is a link to nothing; choose a new directory")
        path = path.resolve()
        name = f"{name} (a link to {str(path)!r})"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{field}={name} already exists and is not empty; choose a new directory")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{field}={name} lies under {str(ancestor)!r}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{field}={name}: cannot create it, {str(ancestor)!r} is not writable")
    return path


def save_pruned(
    model: nn.Module,
    tokenizer,
    export_dir: str | os.PathLike,
    report: PruningReport | None = None,
    compress: bool = False,
    extra_files: dict[str, str] | None = None,
    base_model: str | None = None,
) -> pathlib.Path:
    """``save_pretrained`` (safetensors) + tokenizer + ``pruning_report.json`` + sparsity heat map + a model card
    (``README.md``, naming ``base_model``: what the model was loaded from, by default its ``_name_or_path``).

    With ``compress``, Linear weights that are at least 25% zeros are stored in compressed-tensors' bitmask
    format (``sparse-24-bitmask`` when every one is 2:4, else ``sparse-bitmask``; the ``sparsity_config`` in
    ``config.json``; see :mod:`mosaic_lightning.export.compressed`), so the file shrinks with the sparsity; such a
    directory loads with :func:`mosaic_lightning.load_pruned` (transformers 5 no longer decompresses sparsity
    formats). ``extra_files`` (name -> text) are written alongside, e.g. the resolved recipe.
    """
    with atomic_directory(export_dir) as tmp:
        if compress:
            _save_compressed(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        write_beside_weights(model, tokenizer, tmp, report, extra_files, base_model, config_written=True)
    return pathlib.Path(export_dir).absolute()


def write_beside_weights(
    model: nn.Module,
    tokenizer,
    directory: pathlib.Path,
    report: PruningReport | None = None,
    extra_files: dict[str, str] | None = None,
    base_model: str | None = None,
    config_written: bool = False,
) -> None:
    """Every export file but the weights, the same for an in-memory and a streamed run: config and generation
    config (unless ``save_pretrained`` wrote them already), tokenizer, ``extra_files``, and with a report:
    ``pruning_report.json``, the sparsity heat map, an allocation search's plot (MSP) and the model card."""
    if not config_written:
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
    if report is not None:
        report.save_json(directory / "pruning_report.json")
        report.save_heatmap(directory / "sparsity_heatmap.png")
        report.save_search_plot(directory / "allocation_search.png")
        base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None)
        (directory / "README.md").write_text(model_card(report, base_model), encoding="utf-8")


@contextmanager
def atomic_directory(target: str | os.PathLike, field: str = "export_dir"):
    """A temp directory beside ``target`` to write into; renamed to ``target`` only when the block succeeds,
    removed otherwise, so ``target`` is never half-written and an existing non-empty one is never touched."""
    path = check_export_dir(target, field).absolute()
    created = [parent for parent in path.parents if not parent.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any new dir
        yield tmp
        if path.exists():  # an empty directory: replace it
            path.rmdir()
        os.replace(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # the parents made for this export, unless something else was put there meanwhile
            with suppress(OSError):
                parent.rmdir()
        if _disk_full(err):
            raise OSError(errno.ENOSPC, f"{field}={str(target)!r}: the disk filled up while writing the export "
                          f"({err}); nothing was left at {path} and the partial copy was removed. Free space on "
                          f"{path.parent} or choose another {field}, and run again") from err  # fmt: skip
        raise


def _disk_full(err: BaseException) -> bool:
    """ENOSPC, as Python raises it or as safetensors' Rust writer words it in its own error type."""
    return (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in str(err)


def _save_compressed(model: nn.Module, directory: pathlib.Path) -> None:
    """``save_pretrained`` of the bitmask tensors (shards, tied weights and config as for a dense export),
    then the ``sparsity_config`` into ``config.json``; all inside the temp dir, so a failure leaves nothing."""
    from .compressed import compress_state, write_config_entry

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    packed, entry = compress_state(model, state)
    model.save_pretrained(directory, safe_serialization=True, state_dict=packed)
    write_config_entry(directory, entry)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
