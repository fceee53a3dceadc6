"""The recipes and configs that ship inside the package, found by name from any directory.

``--config mosaic-50`` (or ``mosaic-50.yaml``) names ``mosaic_lightning/recipes/mosaic-50.yaml``; ``--config cpu``
names ``mosaic_lightning/configs/cpu.yaml``. A path that exists is used as given. A checkout-relative path such as
``recipes/mosaic-50.yaml`` or ``configs/deepspeed/zero3-offload.json`` that does not exist from the working
directory is looked up in the package (where the checkout's ``recipes`` and ``configs`` links point), so the same
commands work from a checkout, from another directory and from an installed copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
KINDS = ("recipes", "configs")
_SUFFIXES = (".yaml", ".yml")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHIPPED_PATH = re.compile(r"(\./)?(recipes|configs)/[A-Za-z0-9_./-]+")


def shipped(kind: str | None = None) -> dict[str, Path]:
    """Name (the file name without ``.yaml``) -> file, of the shipped recipes and configs (or one ``kind``)."""
    found = {}
    for folder in (kind,) if kind else KINDS:
        for path in sorted((PACKAGE_DIR / folder).glob("*.yaml")):
            found[path.stem] = path
    return found


def describe(path: Path, width: int = 125) -> str:
    """One line on what a recipe or config is: the first sentence of its leading comment, cut at a clause
    boundary when it is longer than ``width``."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(t for t in lines if t)
    stop = re.search(r"\.(\s|$)", text)
    sentence = text[: stop.start()] if stop else text
    return _shorten(sentence, width)


def _shorten(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    depth, cut = 0, -1
    for i, char in enumerate(text[:width]):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char in ",;:" and i > 20:
            cut = i
    return text[:cut] if cut > 0 else text[: width - 3].rstrip() + "..."


def listing() -> str:
    """What ``mosaic-lightning recipes`` prints: every shipped recipe and config, one line each."""
    out = []
    for kind in KINDS:
        files = shipped(kind)
        width = max(map(len, files), default=0)
        title = "recipes (--config NAME)" if kind == "recipes" else "configs (layer on a recipe: --config NAME)"
        out.append(f"{title}:")
        out += [f"  {name:<{width}}  {describe(path)}" for name, path in files.items()]
    return "\n".join(out)


def packaged_path(value: str | os.PathLike) -> Path | None:
    """The packaged file a checkout-relative ``recipes/...`` or ``configs/...`` path names, when that path does
    not exist from the working directory (else None)."""
    text = os.fspath(value)
    if not _SHIPPED_PATH.fullmatch(text) or ".." in Path(text).parts or Path(text).exists():
        return None
    candidate = PACKAGE_DIR / text.removeprefix("./")
    return candidate if candidate.is_file() else None


def resolve_config(value: str) -> str:
    """``--config``'s value as a file path: a path that exists, a shipped name (with or without ``.yaml``), or a
    checkout-relative ``recipes/<name>.yaml``. Anything else that is neither a name nor a file (inline YAML) is
    returned unchanged. Raises ValueError for a name that is not shipped, listing the names that are."""
    if Path(value).exists():
        return value
    packaged = packaged_path(value)
    if packaged is not None:
        return str(packaged)
    if _NAME.fullmatch(value):
        name = next((value[: -len(s)] for s in _SUFFIXES if value.endswith(s)), value)
        files = shipped()
        if name in files:
            return str(files[name])
        raise ValueError(f"--config {value!r} is neither a file nor a shipped recipe or config; "
                         f"shipped: {', '.join(files)} (mosaic-lightning recipes describes them)")  # fmt: skip
    if value.endswith((*_SUFFIXES, ".json")) and "\n" not in value:
        raise FileNotFoundError(f"--config {value!r}: no such file ({Path(value).absolute()})")
    return value


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config``/``-c`` value resolved by :func:`resolve_config`."""
    out, expect = [], False
    for arg in argv:
        if expect:
            out.append(resolve_config(arg))
            expect = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            expect = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.removeprefix("--config=")))
        else:
            out.append(arg)
    return out
