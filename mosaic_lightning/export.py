"""Saving pruned models as Hugging Face directories, atomically: write a temp dir, then rename.

A user's existing directory is never overwritten or left half-written.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from torch import nn

from .report import PruningReport


def check_export_dir(export_dir: str | os.PathLike) -> pathlib.Path:
    """Fail early (before any weight changes) when the target exists and is not an empty directory."""
    path = pathlib.Path(export_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"export_dir={str(path)!r} already exists and is not empty; choose a new directory"
        )
    return path


def save_pruned(
    model: nn.Module, tokenizer, export_dir: str | os.PathLike, report: PruningReport | None = None
) -> pathlib.Path:
    """``save_pretrained`` (safetensors) + tokenizer + ``pruning_report.json`` + sparsity heat map."""
    path = check_export_dir(export_dir).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the export should look like any new dir
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save_json(tmp / "pruning_report.json")
            report.save_heatmap(tmp / "sparsity_heatmap.png")
        if path.exists():  # an empty directory: replace it
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
