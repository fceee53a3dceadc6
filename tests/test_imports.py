"""The package's names load on first use: the numerics import without Lightning."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mosaic_lightning


def test_prune_model_imports_without_lightning_or_torchmetrics():
    code = ("import sys; from mosaic_lightning import PruningConfig, prune_model; "
            "print(sorted(m for m in ('lightning', 'torchmetrics', 'deepspeed') if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_exported_name_resolves():
    namespace: dict = {}
    exec("from mosaic_lightning import *", namespace)
    assert {name for name in mosaic_lightning.__all__} <= set(namespace)
    assert mosaic_lightning.MosaicPruning.__module__ == "mosaic_lightning.callbacks.mosaic_pruning"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'MosaicPrunning'"):
        mosaic_lightning.MosaicPrunning  # noqa: B018
