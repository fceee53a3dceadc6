"""A Lightning checkpoint given to resume from, checked before any work: readable, safe, a training checkpoint.

torch's own errors name neither the argument nor what was expected (``PytorchStreamReader failed reading zip
archive``), and for a checkpoint holding arbitrary objects torch advises loading it with ``weights_only=False``,
which would run whatever the file holds. Checkpoints are read with ``weights_only=True`` only; such a file is
refused with our own message, which never suggests unsafe loading.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import zipfile

import torch

# Values Lightning itself resolves (the last, best or SLURM checkpoint), not paths.
_LIGHTNING_NAMES = ("last", "best", "hpc", "registry")


def check_checkpoint(ckpt_path: str | os.PathLike, field: str = "ckpt_path") -> None:
    """Raise, naming ``field`` and the file, unless ``ckpt_path`` is a readable Lightning training checkpoint."""
    if str(ckpt_path) in _LIGHTNING_NAMES:
        return
    path = pathlib.Path(ckpt_path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{field}={str(ckpt_path)!r}: {what}; expected a .ckpt file that Lightning wrote")
    checkpoint = _safe_load(path, field)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise ValueError(
            f"{field}={str(ckpt_path)!r} is a torch file but not a Lightning training checkpoint (no state_dict and "
            "loops); expected a .ckpt that a ModelCheckpoint of a training run wrote"
        )


def _safe_load(path: pathlib.Path, field: str):
    """``torch.load(weights_only=True)``; mapped from disk (not read into memory) when it is a zip checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise _unreadable(path, field, "not a pickle of tensors and plain containers") from None
        raise ValueError(
            f"{field}={str(path)!r} holds objects other than tensors and plain containers ({found.group(1)}), which "
            "can run code when loaded; it was refused unread. A checkpoint of this library holds none: use one your "
            "own training run wrote"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise _unreadable(path, field, str(err).split(". ")[0] or type(err).__name__) from None


def _unreadable(path: pathlib.Path, field: str, detail: str) -> ValueError:
    return ValueError(
        f"{field}={str(path)!r} is not a readable checkpoint (truncated, corrupt or not a checkpoint: {detail}); "
        "expected a .ckpt file that Lightning wrote completely, e.g. the previous one of the same run"
    )
