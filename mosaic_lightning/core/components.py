"""Pluggable components (methods, allocations): chosen by shorthand, by class, or by instance.

A component is a plain class with typed ``__init__`` arguments that validates them there, once. jsonargparse
selects one from a recipe or the command line with ``class_path``/``init_args`` (a user's own class from the
user's own module included); the package's own classes also answer to a shorthand (``name``, e.g.
``"wanda"``), found by importing every module of their package, so a new method or allocation is one new file.

Each instance remembers the arguments it was built with, so checkpoints and reports can record
``{"class_path": ..., "init_args": ...}`` of exactly what ran.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from abc import ABC
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="Component")


class Component(ABC):  # noqa: B024 - the abstract methods are declared by each kind (methods, allocations)
    """Base of methods and allocations: records its init arguments and has an optional shorthand ``name``."""

    name: ClassVar[str | None] = None

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        # bind_partial: copy/deepcopy/pickle call __new__ without the arguments, then restore the state.
        bound = inspect.signature(cls.__init__).bind_partial(None, *args, **kwargs)
        bound.apply_defaults()
        self._init_args = {k: v for k, v in list(bound.arguments.items())[1:] if k not in ("args", "kwargs")}
        return self

    @property
    def label(self) -> str:
        """Shorthand name where the class has one, else the class name (tables, logs)."""
        return type(self).__dict__.get("name") or type(self).__name__

    def to_config(self) -> dict[str, Any]:
        """``{"class_path": "pkg.module.Class", "init_args": {...}}``: what a recipe would say to rebuild it."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(self._init_args)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._init_args.items())
        return f"{type(self).__name__}({args})"


def shorthands(base: type[C], package: str) -> dict[str, type[C]]:
    """Shorthand name -> class for the subclasses of ``base`` defined in ``package`` (every module imported)."""
    root = importlib.import_module(package)
    for module in pkgutil.iter_modules(root.__path__):
        importlib.import_module(f"{package}.{module.name}")
    found: dict[str, type[C]] = {}
    pending = list(base.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        name = cls.__dict__.get("name")
        if name and cls.__module__.startswith(package) and not inspect.isabstract(cls):
            found[name] = cls
    return found


def resolve(value: Any, base: type[C], package: str, field: str) -> C:
    """An instance of ``base`` from a shorthand, a ``{"class_path", "init_args"}`` dict or an instance.

    ``class_path`` in a dict may be a shorthand too. Errors name ``field`` and list the allowed values.
    """
    if isinstance(value, base):
        return value
    known = shorthands(base, package)
    if isinstance(value, str):
        if value not in known:
            raise ValueError(
                f"{field}={value!r}; allowed values: {sorted(known)}, or a subclass of {base.__name__} given as "
                f"{{class_path: ..., init_args: ...}}"
            )
        return known[value]()
    if isinstance(value, dict) and "class_path" in value:
        unknown = set(value) - {"class_path", "init_args"}
        if unknown:
            raise ValueError(f"{field}: unknown keys {sorted(unknown)}; allowed: class_path, init_args")
        cls = known.get(value["class_path"]) or _import_class(value["class_path"], base, field)
        return cls(**(value.get("init_args") or {}))
    raise TypeError(
        f"{field}={value!r}; give a shorthand ({sorted(known)}), a {base.__name__} instance or "
        "{class_path: ..., init_args: ...}"
    )


def _import_class(path: str, base: type[C], field: str) -> type[C]:
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except ImportError as error:
        raise ValueError(f"{field}.class_path={path!r}: cannot import module {module_name!r} ({error})") from None
    except AttributeError:
        cls = None
    if cls is None:
        raise ValueError(f"{field}.class_path={path!r}: no class {class_name!r} there")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{field}.class_path={path!r} is not a subclass of {base.__module__}.{base.__name__}")
    return cls
