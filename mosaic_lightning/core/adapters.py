"""Model adapter: *where* to prune. Finds decoder blocks and their projections, architecture by architecture.

Every projection is seen in the ``[out_features, in_features]`` orientation of ``nn.Linear``, whatever its
storage: GPT-2's ``Conv1D`` keeps ``[in, out]`` and its fused ``c_attn`` holds q, k and v in one weight, so a
:class:`Projection` is a (module, row slice, transposed?) view that the rest of the library never special-cases.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .zero import full_shape, is_partitioned

CANONICAL_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where an architecture keeps its blocks and projections.

    ``projections`` maps a short name to a module path inside one block, in execution order. A ``fused``
    entry names a module whose output rows hold several projections in equal parts (GPT-2's ``c_attn``).
    """

    blocks: str
    projections: dict[str, str]
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)


_LLAMA = ArchitectureSpec(
    blocks="model.layers",
    projections={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
)
_OPT = ArchitectureSpec(
    blocks="model.decoder.layers",
    projections={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "up": "fc1",
        "down": "fc2",
    },
)
_GPT2 = ArchitectureSpec(
    blocks="transformer.h",
    projections={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    fused={"qkv": ("q", "k", "v")},
)
KNOWN_ARCHITECTURES: dict[str, ArchitectureSpec] = {"llama-family": _LLAMA, "opt": _OPT, "gpt2": _GPT2}


@dataclass(frozen=True, eq=False)
class Projection:
    """One prunable projection of one block, viewed as ``[out, in]``."""

    layer: int
    name: str
    module: nn.Module
    param_name: str
    rows: slice | None = None
    transposed: bool = False

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.module.weight

    def weight_view(self) -> torch.Tensor:
        """The ``[out, in]`` view of this projection's weight; shares storage, so in-place edits stick."""
        w = self.module.weight.data
        if is_partitioned(self.module.weight) and w.numel() == 0:  # DeepSpeed ZeRO-3 hook point
            raise RuntimeError(f"{self.param_name} is partitioned by ZeRO-3: read it inside zero.gathered(module)")
        return self.view_of(w)

    def view_of(self, full: torch.Tensor) -> torch.Tensor:
        """This projection's ``[out, in]`` view of a tensor shaped like the parameter (weight, mask, gradient)."""
        view = full.t() if self.transposed else full
        return view if self.rows is None else view[self.rows]

    def to_param_layout(self, mask_out_in: torch.Tensor, full: torch.Tensor) -> None:
        """Write an ``[out, in]`` tensor into ``full`` (shaped like the parameter) at this projection's place."""
        self.view_of(full).copy_(mask_out_in)

    @property
    def out_features(self) -> int:
        return self._shape()[0]

    @property
    def in_features(self) -> int:
        return self._shape()[1]

    def _shape(self) -> tuple[int, int]:
        # From the parameter's full shape, so sizes are known while ZeRO-3 has partitioned the values away.
        rows, cols = full_shape(self.module.weight)
        out, inp = (cols, rows) if self.transposed else (rows, cols)
        return (out if self.rows is None else len(range(out)[self.rows])), inp

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_projection_module(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D is a Module with a 2-D weight and nf; avoid importing it.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _base_layer(module: nn.Module | None) -> nn.Module | None:
    """The layer holding the weight: itself, or the ``base_layer`` a peft LoRA wrapper keeps it in."""
    return getattr(module, "base_layer", module)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft ``PeftModel`` (LoRA layers stay in place), or ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


class ModelAdapter:
    """Blocks and projections of a causal LM, filtered by ``targets`` and ``exclude``.

    ``targets``/``exclude`` items are short names (``"q"``, ``"down"``) or regular expressions matched
    against the full module name (``r"model\\.layers\\.0\\..*"``). ``spec`` overrides auto-detection for an
    architecture this library does not know yet.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        spec: ArchitectureSpec | None = None,
    ) -> None:
        # Under a peft wrapper (LoRA attached before pruning, as LoRARecovery does) the projections are the
        # wrapped base layers; parameter names stay the plain HF ones.
        self.model = model = unwrap_peft(model)
        self.spec = spec or detect_architecture(model)
        blocks = _get(model, self.spec.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"spec.blocks={self.spec.blocks!r} is not a ModuleList in {type(model).__name__}")
        self.block_list = blocks  # the model's own ModuleList (calibration swaps entries for a moment)
        self.blocks: list[nn.Module] = list(blocks)
        self._all = [self._block_projections(i) for i in range(len(self.blocks))]
        self._check_names(targets, "targets")
        self._check_names(exclude, "exclude")
        self._selected = [
            [p for p in projs if self._matches(p, targets) and not (exclude and self._matches(p, exclude))]
            for projs in self._all
        ]
        if not any(self._selected):
            raise ValueError(f"targets={targets!r} with exclude={exclude!r} select no projection")

    # -- discovery -----------------------------------------------------------------------------------
    def _block_projections(self, layer: int) -> list[Projection]:
        block = self.blocks[layer]
        prefix = f"{self.spec.blocks}.{layer}"
        found = []
        for short, path in self.spec.projections.items():
            module = _base_layer(_get(block, path))
            if module is None or not _is_projection_module(module):
                raise ValueError(f"block {prefix} has no projection module at {path!r}")
            transposed = not isinstance(module, nn.Linear)
            param_name = f"{prefix}.{path}.weight"
            parts = self.spec.fused.get(short)
            if parts is None:
                found.append(Projection(layer, short, module, param_name, None, transposed))
                continue
            shape = full_shape(module.weight)
            out = shape[1] if transposed else shape[0]
            size = out // len(parts)
            for i, part in enumerate(parts):
                rows = slice(i * size, (i + 1) * size)
                found.append(Projection(layer, part, module, param_name, rows, transposed))
        return found

    def rediscover(self, layer: int) -> None:
        """Find block ``layer``'s projection modules again, after compaction replaced them by smaller ones (the
        old modules, and their weights, are no longer referenced from here)."""
        selected = {p.name for p in self._selected[layer]}
        self._all[layer] = self._block_projections(layer)
        self._selected[layer] = [p for p in self._all[layer] if p.name in selected]

    def module_name(self, proj: Projection) -> str:
        return proj.param_name.removesuffix(".weight")

    def _matches(self, proj: Projection, patterns: Sequence[str] | None) -> bool:
        if patterns is None:
            return True
        full = self.module_name(proj)
        return any(p == proj.name or re.fullmatch(p, full) for p in patterns)

    def _check_names(self, patterns: Sequence[str] | None, field_name: str) -> None:
        for pattern in patterns or ():
            check_pattern(pattern, field_name)
            if not any(self._matches(p, [pattern]) for projs in self._all for p in projs):
                names = sorted({p.name for p in self._all[0]})
                raise ValueError(
                    f"{field_name} item {pattern!r} matches no projection; use short names {names} or a "
                    f"regular expression over module names such as {self.module_name(self._all[0][0])!r}"
                )

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def projections(self, layer: int) -> list[Projection]:
        """Targeted projections of one block, in execution order."""
        return self._selected[layer]

    def every_projection(self, layer: int) -> list[Projection]:
        """All projections of a block, targeted or not."""
        return self._all[layer]

    def all_projections(self) -> list[Projection]:
        return [p for projs in self._selected for p in projs]

    def projection_modules(self, layer: int) -> list[nn.Module]:
        """Distinct modules behind the targeted projections of a block (a fused module appears once)."""
        seen: dict[int, nn.Module] = {}
        for p in self.projections(layer):
            seen.setdefault(id(p.module), p.module)
        return list(seen.values())


def check_pattern(pattern: str, field_name: str) -> None:
    """A ``targets``/``exclude`` item must be a short name or a valid regular expression."""
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{field_name} item {pattern!r} is not a valid regular expression ({error})") from None


def detect_architecture(model: nn.Module) -> ArchitectureSpec:
    """The first known spec whose blocks and projections all exist; else a clear error listing Linears."""
    for spec in KNOWN_ARCHITECTURES.values():
        blocks = _get(model, spec.blocks)
        if (
            isinstance(blocks, nn.ModuleList)
            and len(blocks) > 0
            and all(
                _is_projection_module(_base_layer(_get(blocks[0], p)) or nn.Identity())
                for p in spec.projections.values()
            )
        ):
            return spec
    linears = [n for n, m in model.named_modules() if _is_projection_module(m)]
    shown = ", ".join(linears[:24]) + (" ..." if len(linears) > 24 else "")
    raise ValueError(
        f"unknown architecture {type(model).__name__}: known are {sorted(KNOWN_ARCHITECTURES)}. Linear layers "
        f"found: {shown}. Describe it with ArchitectureSpec(blocks='<path to ModuleList>', "
        f"projections={{'q': '<path inside a block>', ...}}) and pass it as spec="
    )
