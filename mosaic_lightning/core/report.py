"""Pruning report: per-projection requested/achieved sparsity, outliers and time; totals; table; heat map."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class ProjectionReport:
    key: str
    layer: int
    name: str
    module: str
    numel: int
    requested_sparsity: float
    achieved_sparsity: float  # share of weights this pruning removed (mask)
    structured_sparsity: float  # share removed as whole units (channels/heads)
    zero_fraction: float  # share of exact zeros in the weights (includes zeros the dense model already had)
    outlier_ratio: float | None
    seconds: float


@dataclass
class PruningReport:
    config: dict
    projections: list[ProjectionReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    structure: dict[str, list[int]] = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)  # what the allocation measured or searched (MSP: its search)
    tasks: dict = field(default_factory=dict)  # lm-eval metrics: {task: {"dense": {...}, "pruned": {...}}}
    io_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # streamed runs: {phase: {read, written}}

    @property
    def params_targeted(self) -> int:
        return sum(p.numel for p in self.projections)

    @property
    def params_pruned(self) -> int:
        return sum(round(p.achieved_sparsity * p.numel) for p in self.projections)

    @property
    def achieved_sparsity(self) -> float:
        return self.params_pruned / max(self.params_targeted, 1)

    @property
    def structured_params_removed(self) -> int:
        return sum(round(p.structured_sparsity * p.numel) for p in self.projections)

    def record_peak_memory(self, phase: str) -> None:
        """Peak resident memory of this process (and CUDA's peak allocation when on a GPU) since the last
        :func:`reset_peak_memory`, or since the start."""
        self.peak_memory_mb.update(peak_memory(phase))

    def record_run_peak_memory(self) -> None:
        """``total_*``: the whole run's peaks, the largest of every recorded phase's (phases may have reset the
        process's peak) and the peak since the last reset."""
        now = peak_memory("total")
        for key in now:
            kind = key.removeprefix("total")
            now[key] = max([now[key], *(v for k, v in self.peak_memory_mb.items() if k.endswith(kind))])
        self.peak_memory_mb.update(now)

    def to_dict(self) -> dict:
        return {
            "requested_sparsity": self.config.get("sparsity"),
            "achieved_sparsity": self.achieved_sparsity,
            "params_targeted": self.params_targeted,
            "params_pruned": self.params_pruned,
            "params_kept": self.params_targeted - self.params_pruned,
            "structured_params_removed": self.structured_params_removed,
            "structured_share": self.structured_params_removed / max(self.params_targeted, 1),
            **self.metrics,
            "timings_s": self.timings,
            "peak_memory_mb": self.peak_memory_mb,
            "calibration": self.calibration,
            "config": self.config,
            "projections": [asdict(p) for p in self.projections],
            "structure": self.structure,
            "allocation": self.allocation,
            "tasks": self.tasks,
            "io_bytes": self.io_bytes,
        }

    def save_json(self, path: str | os.PathLike) -> None:
        """Written beside ``path`` and renamed onto it: a reader never sees half a report."""
        partial = f"{os.fspath(path)}.partial"
        with open(partial, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        os.replace(partial, path)

    def format_table(self) -> str:
        """Layers x projections table of achieved sparsity (percent), then one line of totals."""
        names = list(dict.fromkeys(p.name for p in self.projections))
        by_key = {(p.layer, p.name): p for p in self.projections}
        layers = sorted({p.layer for p in self.projections})
        lines = ["layer " + " ".join(f"{n:>6}" for n in names)]
        for layer in layers:
            cells = [by_key.get((layer, n)) for n in names]
            lines.append(
                f"{layer:>5} " + " ".join(f"{100 * c.achieved_sparsity:6.2f}" if c else f"{'-':>6}" for c in cells)
            )
        lines.append(f"{_label(self.config.get('method'))}, {_label(self.config.get('allocation'))} allocation, "
                     f"{self.config.get('pattern')}: {100 * self.achieved_sparsity:.3f}% of {self.params_targeted:,} "
                     f"targeted weights pruned (requested {100 * self.config.get('sparsity', 0):.2f}%)")
        return "\n".join(lines)

    def summary(self) -> str:
        parts = [
            f"method={_label(self.config.get('method'))} allocation={_label(self.config.get('allocation'))} "
            f"pattern={self.config.get('pattern')}",
            f"requested sparsity {100 * self.config.get('sparsity', 0):.2f}%, achieved "
            f"{100 * self.achieved_sparsity:.3f}% of {self.params_targeted:,} targeted weights",
        ]
        parts += [f"{k} {v:.3f}" for k, v in self.metrics.items()]
        parts.append("time " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return " | ".join(parts)

    def save_heatmap(self, path: str | os.PathLike) -> None:
        """PNG heat map of allocated sparsity, layers x projections."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(dict.fromkeys(p.name for p in self.projections))
        layers = sorted({p.layer for p in self.projections})
        grid = torch.full((len(layers), len(names)), float("nan"))
        for p in self.projections:
            grid[layers.index(p.layer), names.index(p.name)] = 100 * p.requested_sparsity
        fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(names), 1.5 + 0.22 * len(layers)))
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("projection")
        ax.set_ylabel("layer")
        ax.set_title(f"allocated sparsity (%), {_label(self.config.get('allocation'))}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def save_search_plot(self, path: str | os.PathLike) -> bool:
        """PNG of an allocation search's fitness per generation (MSP); False when the allocation searched nothing."""
        history = self.allocation.get("history")
        if not history:
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        generations = [h["generation"] for h in history]
        ax.plot(generations, [h["best"] for h in history], marker="o", label="best")
        ax.plot(generations, [h["mean"] for h in history], marker=".", label="population mean")
        ax.set_xlabel("generation")
        ax.set_ylabel("fitness (held-in perplexity)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"allocation search, {_label(self.config.get('allocation'))}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True


def _label(value) -> str:
    """A method or allocation as recorded in the config: its shorthand, or the class name of its class_path."""
    if isinstance(value, dict):
        return str(value.get("class_path", "?")).rpartition(".")[2]
    return str(value)


def peak_memory(phase: str) -> dict[str, float]:
    """``{phase}_rss`` (and ``{phase}_cuda`` on a GPU) in MB: the peaks since :func:`reset_peak_memory`."""
    peaks = {f"{phase}_rss": _peak_rss_mb()}
    if torch.cuda.is_available():
        peaks[f"{phase}_cuda"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def reset_peak_memory() -> None:
    """Start a new peak-memory phase: Linux resets the process's peak RSS (``VmHWM``) on writing 5 to
    ``/proc/self/clear_refs``; elsewhere the peak stays the process's since its start."""
    with contextlib.suppress(OSError):
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_rss_mb() -> float:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
