"""What the command prints: the run's summary table, quiet one-shot runs, and one-line errors.

* :func:`run_summary`: the table a run ends with, every figure read from the pruning report (``pruning_report.json``
  holds the same numbers).
* :func:`quiet_dependencies`: drops what third-party libraries print that does not concern the user (Lightning's
  advertising tips, deprecation warnings raised inside Lightning, DeepSpeed's accelerator notice in runs that do
  not use DeepSpeed, and for one-shot runs Lightning's "max_steps=0 reached").
* :func:`reported_errors`: an exception from the command ends in ``error: <message>`` and exit status 1, as
  argparse does; ``MOSAIC_TRACEBACK=1`` shows the full traceback instead (for bug reports).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

TRACEBACK_ENV = "MOSAIC_TRACEBACK"
WEIGHT_SUFFIXES = (".safetensors",)


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def _add_filter(logger: str, *fragments: str) -> None:
    target = logging.getLogger(logger)
    if not any(isinstance(f, _DropMessages) and f.fragments == fragments for f in target.filters):
        target.addFilter(_DropMessages(*fragments))


def quiet_dependencies(one_shot: bool = False, deepspeed: bool = False) -> None:
    """Filters for what dependencies print that does not concern a user of this command (idempotent)."""
    # Lightning's rank_zero_info logs through whichever of these its last import named.
    lightning_info = ("lightning_utilities.core.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning.pytorch.utilities.rank_zero")  # fmt: skip
    for name in lightning_info:
        _add_filter(name, "💡 Tip:")
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        # Attributed to a frame inside Lightning: Lightning's use of its dependencies, nothing the user can change.
        warnings.filterwarnings("ignore", category=category, module=r"lightning(\.|$)")
    if one_shot:
        for name in lightning_info:
            _add_filter(name, "`Trainer.fit` stopped: `max_steps=0` reached")
    if not deepspeed:
        # accelerate imports DeepSpeed whenever it is installed (transformers' save_pretrained unwraps models
        # through it), and DeepSpeed then announces the accelerator it picked.
        _add_filter("DeepSpeed", "Setting accelerator to CPU")


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """An exception ends the command with ``error: <message>`` on stderr and exit status 1; with
    ``MOSAIC_TRACEBACK=1`` in the environment it propagates with its traceback."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - the command's last line, by design
        if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
            raise
        message = one_line(str(error)) or type(error).__name__
        if isinstance(error, KeyError) and error.args:
            message = f"{type(error).__name__}: {error.args[0]}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def one_line(message: str, limit: int = 600) -> str:
    """A message as one line, cut after ``limit`` characters (a config file's whole text, say). jsonargparse
    wraps an error raised while it builds a class given in a union (a strategy, a logger) in a list of what each
    union member said and a dump of the value: keep what the class said, without the ``Expected a <class ...>``
    of the members that did not apply."""
    line = _joined(message)
    return line if len(line) <= limit else f"{line[:limit]} ... ({TRACEBACK_ENV}=1 shows all of it)"


def _joined(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines()]
    lines = [line for line in lines if line and not line.startswith("Given value")]
    if "Errors:" in lines:
        where = [line for line in lines[: lines.index("Errors:")] if line.startswith("Parser key")]
        said = [line.removeprefix("- ") for line in lines[lines.index("Errors:") + 1 :]]
        said = [text for text in said if not text.startswith(("Expected a <class", "Not a valid subclass"))]
        if said:
            return " ".join([*where, "; ".join(said)])
    return " ".join(lines)


def weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``) in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _size(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return "-"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{int(value):,}"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 600 else f"{value / 60:.1f} min"


def _label(value) -> str:
    if isinstance(value, Mapping):
        value = value.get("class_path", "?")
    return str(value).rsplit(".", 1)[-1]


def phase_times(report) -> dict[str, float]:
    """Seconds per phase, in run order, from the report: calibration/pruning timings, the evaluations
    (``*_eval_s``, lm-eval's ``*_s``), the export; ``total`` last."""
    times = {k.replace("_", " "): v for k, v in report.timings.items() if k != "total"}
    for key, value in report.metrics.items():
        if key.endswith("_s") and isinstance(value, int | float):
            times[key.removesuffix("_s").replace("_", " ")] = value
    if "export" in times:
        times["export"] = times.pop("export")
    if "total" in report.timings:
        times["total"] = report.timings["total"]
    return times


def run_summary(report, export_dir: str | os.PathLike | None = None) -> str:
    """The table a run ends with. Every figure comes from ``report`` (its metrics, timings, peak memory and
    sizes), so it matches ``pruning_report.json``."""
    from .evaluation.zero_shot import evaluation_rows

    metrics = report.metrics
    rows: list[tuple[str, str, str]] = [("", "dense", "pruned")]
    rows += [(label, dense.replace(" ± ", " ±"), pruned.replace(" ± ", " ±"))
             for label, dense, pruned in evaluation_rows(metrics, report.tasks)]  # fmt: skip
    if "ppl_pruned" in metrics or "ppl_dense" in metrics:  # 3 decimals, as the report's readers quote them
        rows[1] = ("perplexity", _fixed(metrics.get("ppl_dense")), _fixed(metrics.get("ppl_pruned")))
    for key in sorted(k for k in metrics if k.startswith("ppl_") and k not in ("ppl_dense", "ppl_pruned")):
        rows.append((f"perplexity ({key.removeprefix('ppl_')})", "", _fixed(metrics[key])))
    if "params_dense" in metrics or "params_export" in metrics:
        zeros = metrics.get("params_export", 0) - metrics.get("nonzero_params_export", metrics.get("params_export", 0))
        pruned = _count(metrics.get("params_export")) + (f" ({zeros:,} zero)" if zeros else "")
        rows.append(("parameters", _count(metrics.get("params_dense")), pruned))
    if "weights_bytes_dense" in metrics or "weights_bytes_export" in metrics:
        rows.append(("weight files", _size(metrics.get("weights_bytes_dense")),
                     _size(metrics.get("weights_bytes_export"))))  # fmt: skip
    config = report.config
    details = [
        ("sparsity", f"{100 * report.achieved_sparsity:.2f}% of {report.params_targeted:,} targeted weights "
                     f"(requested {100 * config.get('sparsity', 0):.2f}%; {_label(config.get('method'))}, "
                     f"{_label(config.get('allocation'))} allocation, {config.get('pattern')})"),
        ("time", ", ".join(f"{k} {_seconds(v)}" for k, v in phase_times(report).items())),
    ]  # fmt: skip
    peaks = report.peak_memory_mb
    memory = [f"{peaks['total_rss'] / 1024:.2f} GiB resident"] if "total_rss" in peaks else []
    memory += [f"{peaks['total_cuda'] / 1024:.2f} GiB GPU" for _ in [0] if "total_cuda" in peaks]
    if memory:
        details.append(("peak memory", ", ".join(memory)))
    if export_dir:
        details.append(("export", f"{export_dir} (figures in pruning_report.json)"))
    key = max(len(k) for k, *_ in rows + details)
    dense = max(len(r[1]) for r in rows)
    lines = [f"{a:<{key}}  {b:<{dense}}  {c}".rstrip() for a, b, c in rows] if len(rows) > 1 else []
    lines += [f"{k:<{key}}  {v}" for k, v in details]
    rule = "-" * min(max(map(len, lines)), 100)
    return "\n".join([rule, *lines, rule])


def _fixed(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
