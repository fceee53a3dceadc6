"""Zero-shot accuracy with lm-evaluation-harness: its ``HFLM`` wrapped around the in-memory model.

Task names are checked (and a :class:`TaskManager` built) before any pruning work, so a typo fails in seconds
instead of after the prune. The package's own task folder (``mosaic_lightning/evaluation/tasks``: the local BIG-bench
tasks, which need no hub) is always on lm-eval's include path; a user's folder of task YAMLs is added with
``include_path``. Standard lm-eval names (``arc_easy``, ``hellaswag``, ...) work where their datasets can be
downloaded.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from collections.abc import Mapping, Sequence

from torch import nn

from .tasks import TASK_DIR

TaskResults = Mapping[str, Mapping[str, Mapping]]  # {task: {"dense" | "pruned": {metric: value}}}


def check_task_options(
    tasks: Sequence[str] | str | None, include_path: str | None, limit: int | None
) -> list[str] | None:
    """The task names as a list (one name works too), after the checks that need no lm-eval index; errors name
    the CLI flag."""
    if tasks is None:
        for flag, value in (("--evaluate_include_path", include_path), ("--evaluate_limit", limit)):
            if value is not None:
                raise ValueError(f"{flag}={value!r} has no effect without --evaluate_tasks")
        return None
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise ValueError(f"--evaluate_tasks={tasks!r}; give a non-empty list of lm-eval task names, e.g. "
                         "'[social_iqa_local]'")  # fmt: skip
    if include_path is not None and not os.path.isdir(include_path):
        raise NotADirectoryError(f"--evaluate_include_path={include_path!r} is not a directory of lm-eval task YAMLs")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--evaluate_limit={limit!r}; must be an integer >= 1 (or null for every item)")
    return tasks


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``tasks``, or a ``ValueError`` naming the unknown ones.

    The package's folder and ``include_path`` are indexed first; lm-eval's own task index (thousands of tasks,
    slower to build) only when a name is not found there.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DIR)] + ([str(include_path)] if include_path else [])
    local = TaskManager(include_path=paths, include_defaults=False)
    if set(tasks) <= set(local.all_tasks):
        return local
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = sorted({m for t in unknown for m in difflib.get_close_matches(t, manager.all_tasks, n=5, cutoff=0.6)})
        raise ValueError(
            f"--evaluate_tasks: unknown lm-eval task(s) {unknown}; similar: {hints or 'none'}; local tasks (no hub "
            f"needed): {local.all_tasks}; lm-eval knows {len(manager.all_tasks)} tasks and groups "
            "(`lm-eval ls tasks`); --evaluate_include_path adds a folder of your own task YAMLs"
        )
    return manager


def zero_shot_accuracy(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    manager,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float | None]]:
    """lm-eval's metrics per task (``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr``, ...) and the number
    of items scored (``samples``), from ``HFLM`` on ``model`` as it is in memory.

    Runs in the calling process only (the CLI calls it on rank 0). The model's train/eval mode is restored,
    global RNGs are left alone (lm-eval reseeds them by default, which would desynchronise DDP ranks), and the
    tokenizer is copied because ``HFLM`` sets a pad token on the one it is given.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        output = simple_evaluate(
            lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,
        )  # fmt: skip
    finally:
        model.train(was_training)
    return {
        task: {**_metric_values(values), "samples": output["n-samples"].get(task, {}).get("effective")}
        for task, values in output["results"].items()
    }


def _metric_values(values: Mapping) -> dict[str, float | None]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": None}``:
    lm-eval's names, the filter kept only where it is not the default ``none``."""
    out = {}
    for key, value in values.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name:
            continue  # "alias", "name", ...: labels, not metrics
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        out[metric if filter_name == "none" else key] = None if number is not None and math.isnan(number) else number
    return out


def evaluation_rows(metrics: Mapping[str, float], tasks: TaskResults) -> list[tuple[str, str, str]]:
    """``(label, dense, pruned)`` per perplexity and task metric (``± stderr`` where lm-eval gave one), shared by
    the printed table and the model card."""
    rows = []
    if "ppl_dense" in metrics or "ppl_pruned" in metrics:
        rows.append(("perplexity", metric_cell(metrics.get("ppl_dense")), metric_cell(metrics.get("ppl_pruned"))))
    for task, phases in tasks.items():
        dense, pruned = phases.get("dense", {}), phases.get("pruned", {})
        items = dense.get("samples") or pruned.get("samples")
        for name in [m for m in {**dense, **pruned} if not m.endswith("_stderr") and m != "samples"]:
            rows.append((f"{task} {name}" + (f" ({items} items)" if items else ""),
                         metric_cell(dense.get(name), dense.get(f"{name}_stderr")),
                         metric_cell(pruned.get(name), pruned.get(f"{name}_stderr"))))  # fmt: skip
    return rows


def evaluation_table(metrics: Mapping[str, float], tasks: TaskResults) -> str:
    """Dense vs pruned as aligned text, for the log."""
    rows = evaluation_rows(metrics, tasks)
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'':<{width}}  {'dense':>16}  {'pruned':>16}"]
    lines += [f"{label:<{width}}  {dense:>16}  {pruned:>16}" for label, dense, pruned in rows]
    return "\n".join(lines)


def metric_cell(value: float | None, stderr: float | None = None) -> str:
    """``0.3560 ± 0.0214``, ``-`` when not measured."""
    if value is None:
        return "-"
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"
