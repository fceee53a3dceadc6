"""Local BIG-bench multiple-choice tasks for lm-eval (``social_iqa_local``, ``strategyqa_local``).

The YAMLs beside this file name these loaders as lm-eval's ``custom_dataset``, so lm-eval reads the BIG-bench
``task.json`` files from disk instead of calling ``datasets.load_dataset`` on a hub. The data is not copied into
the package: it is found at ``$MOSAIC_BIGBENCH_DIR``, else at ``../shared/data/bigbench`` beside the repository
checkout (where CI has it) or beside the working directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets import Dataset, DatasetDict

BIGBENCH_ENV = "MOSAIC_BIGBENCH_DIR"
_RELATIVE = Path("shared") / "data" / "bigbench"


def bigbench_roots() -> list[Path]:
    """Folders searched for ``<task>/task.json``: the environment override alone when it is set."""
    if os.environ.get(BIGBENCH_ENV):
        return [Path(os.environ[BIGBENCH_ENV])]
    checkout = Path(__file__).resolve().parents[len(__name__.split(".")) - 1]  # the folder holding the package
    return list(dict.fromkeys([checkout.parent / _RELATIVE, Path.cwd().resolve().parent / _RELATIVE]))


def task_file(name: str) -> Path:
    """The ``task.json`` of BIG-bench task ``name``; a missing file names every place tried and the override."""
    tried = [root / name / "task.json" for root in bigbench_roots()]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"BIG-bench task {name!r} (lm-eval task {name}_local): no task.json at {', '.join(map(str, tried))}; "
        f"put the BIG-bench data in ../shared/data/bigbench beside the repository or set {BIGBENCH_ENV} to the "
        f"folder that holds {name}/task.json"
    )


def load_bigbench(name: str) -> DatasetDict:
    """One ``test`` split of ``{"input", "choices", "label"}`` rows, options in the file's order, ``label`` the
    index of the option whose target score is 1 (every item of the shipped tasks has exactly one)."""
    path = task_file(name)
    rows = []
    for i, example in enumerate(json.loads(path.read_text(encoding="utf-8"))["examples"]):
        choices = list(example["target_scores"])
        gold = [j for j, choice in enumerate(choices) if example["target_scores"][choice] == 1]
        if len(gold) != 1:
            raise ValueError(f"{path}: example {i} has {len(gold)} correct options; expected exactly one")
        rows.append({"input": example["input"], "choices": choices, "label": gold[0]})
    return DatasetDict({"test": Dataset.from_list(rows)})


def social_iqa(**_metadata) -> DatasetDict:
    """lm-eval ``custom_dataset`` hook (it passes task metadata as keywords, unused here)."""
    return load_bigbench("social_iqa")


def strategyqa(**_metadata) -> DatasetDict:
    """lm-eval ``custom_dataset`` hook (it passes task metadata as keywords, unused here)."""
    return load_bigbench("strategyqa")
