"""A Hugging Face model card (``README.md``) for an export: YAML front matter a hub reads (base model, library,
tags), the pruning recipe, achieved sparsity per projection type, and the measured figures before and after, so
the folder can be pushed to a hub as it is."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ..core.assets import BUNDLED_MODEL
from ..core.report import PruningReport
from ..evaluation.zero_shot import evaluation_rows

BUNDLED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the bundled GGUF was quantized from
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_base_model(pretrained: str | None) -> str | None:
    """The hub id a card may name as ``base_model``: the bundled model's origin, a hub id as given, and None for
    local directories (a hub rejects a path there)."""
    if pretrained == BUNDLED_MODEL:
        return BUNDLED_BASE_MODEL
    if not pretrained or Path(pretrained).exists() or not _HUB_ID.match(pretrained):
        return None
    return pretrained


def model_card(report: PruningReport, base_model: str | None = None) -> str:
    """The card's text; ``base_model`` is the source the model was loaded from (hub id, local dir or bundled)."""
    hub_id = hub_base_model(base_model)
    pattern = str(report.config.get("pattern", "unstructured"))
    front = {**({"base_model": hub_id} if hub_id else {}), "library_name": "transformers",
             "pipeline_tag": "text-generation",
             "tags": ["pruned", "sparsity", f"sparsity-{round(100 * report.achieved_sparsity)}", pattern,
                      "mosaic-lightning"]}  # fmt: skip
    sections = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {hub_id or base_model or 'Model'}, pruned to {100 * report.achieved_sparsity:.2f}% sparsity",
        f"Pruned with mosaic-lightning from `{base_model or 'unknown'}`: "
        f"{report.params_pruned:,} of {report.params_targeted:,} projection weights set to zero "
        f"({report.structured_params_removed:,} of them as whole channels/heads). Load it with "
        "`AutoModelForCausalLM.from_pretrained(folder)`; exports with compressed storage or per-layer shapes "
        "load with `mosaic_lightning.load_pruned(folder)`.",
        _what_the_zeros_buy(report),
        "## Recipe\n\n```yaml\n" + yaml.safe_dump(report.config, sort_keys=False) + "```",
        "## Sparsity per projection type\n\n" + _sparsity_table(report),
    ]
    sections = [s for s in sections if s]
    evaluation = _evaluation_table(report)
    if evaluation:
        sections.append("## Evaluation (before / after pruning)\n\n" + evaluation)
    return "\n\n".join(sections) + "\n"


def _what_the_zeros_buy(report: PruningReport) -> str:
    """Say plainly what the export's sparsity buys: removed units make a smaller dense model that any runtime
    runs faster; zeros left in place (unstructured, N:M) give no speed or size in today's standard runtimes."""
    removed = report.structured_params_removed
    zeros = report.params_pruned - removed
    text = []
    if removed:
        text.append(f"{removed:,} weights went as whole MLP channels and attention heads: the compacted model is "
                    "physically smaller, and runs faster in any runtime as it is.")  # fmt: skip
    if zeros:
        text.append(f"{zeros:,} weights are zeros kept in place (unstructured or N:M). Standard runtimes no longer "
                    "run such zeros faster or store them smaller (vLLM removed its 2:4 sparse kernels and "
                    "compressed-tensors its sparse compression in 2026); the compressed export saves storage and "
                    "loads with `mosaic_lightning.load_pruned`.")  # fmt: skip
    return "## What the sparsity buys\n\n" + " ".join(text) if text else ""


def _sparsity_table(report: PruningReport) -> str:
    """Parameter-weighted achieved sparsity over all layers, one row per projection name, then the total."""
    lines = ["| projection | weights | pruned | sparsity |", "| --- | ---: | ---: | ---: |"]
    for name in dict.fromkeys(p.name for p in report.projections):
        rows = [p for p in report.projections if p.name == name]
        numel, pruned = sum(p.numel for p in rows), sum(round(p.achieved_sparsity * p.numel) for p in rows)
        lines.append(f"| {name} | {numel:,} | {pruned:,} | {100 * pruned / numel:.2f}% |")
    lines.append(f"| **all** | {report.params_targeted:,} | {report.params_pruned:,} | "
                 f"{100 * report.achieved_sparsity:.2f}% |")  # fmt: skip
    return "\n".join(lines)


def _evaluation_table(report: PruningReport) -> str:
    """Perplexity and lm-eval metrics, dense vs pruned, as Markdown; empty when nothing was measured."""
    rows = evaluation_rows(report.metrics, report.tasks)
    if not rows:
        return ""
    header = ["| metric | dense | pruned |", "| --- | ---: | ---: |"]
    return "\n".join(header + [f"| {label} | {dense} | {pruned} |" for label, dense, pruned in rows])
