"""Mask store: one compact bool mask per pruned parameter, applied in place after every optimizer step.

Masks are keyed by parameter name and shaped like the parameter (GPT-2's Conv1D included), so applying them
needs no knowledge of architectures. Checkpoints hold them as packed bits (1/32 of an fp32 copy); there is no
``torch.nn.utils.prune`` re-parametrisation and no dense float mask.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .zero import mask_parameter_, sync_master_

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.detach().flatten().to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    bits = (packed.to(torch.uint8)[:, None] & _BIT_WEIGHTS) > 0
    return bits.flatten()[:numel].view(shape)


def canonical_name(name: str) -> str:
    """Parameter name as in the plain HF model, also inside a peft wrapper (``base_model.model.``,
    ``.base_layer.``), so masks keep applying while LoRA adapters are attached."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {canonical_name(n): p for n, p in model.named_parameters()}


class MaskStore:
    """Keep-masks (True = keep) by parameter name."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def set(self, name: str, keep: torch.Tensor) -> None:
        self.masks[name] = keep.detach().to(torch.bool)

    @torch.no_grad()
    def enforce_(self, model: nn.Module, optimizers: Iterable = ()) -> None:
        """Zero every pruned weight of ``model`` in place, and its optimizer moments: the one mask path for every
        strategy. Plain and DDP parameters: the weight, then the moments of ``optimizers`` (torch optimizers;
        others are skipped). DeepSpeed ZeRO-1/2/3: this rank's visible share, fp32 master and Adam moments."""
        params = named_parameters(model)
        for name, keep in self.masks.items():
            mask_parameter_(params[name], keep)
        for optimizer in optimizers:
            if isinstance(optimizer, torch.optim.Optimizer):
                self._zero_optimizer_state(optimizer, params)

    @torch.no_grad()
    def adopt_(self, model: nn.Module, optimizers: Iterable = ()) -> None:
        """Right after pruning: write the pruned weights into any DeepSpeed fp32 masters (a no-op elsewhere),
        then :meth:`enforce_`, so no optimizer state of a pruned entry survives."""
        params = named_parameters(model)
        for name in self.masks:
            sync_master_(params[name])
        self.enforce_(model, optimizers)

    def _zero_optimizer_state(self, optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> None:
        """Zero optimizer moments of pruned entries, so momentum cannot regrow them after unmasking."""
        by_param = {id(p): self.masks[n] for n, p in params.items() if n in self.masks}
        for group in optimizer.param_groups:
            for param in group["params"]:
                keep = by_param.get(id(param))
                if keep is None:
                    continue
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == keep.shape:
                        value.masked_fill_(~keep.to(value.device), 0)

    def num_pruned(self) -> int:
        return sum(int((~m).sum()) for m in self.masks.values())

    def numel(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def state_dict(self) -> dict:
        return {name: {"shape": list(keep.shape), "bits": pack_bits(keep)} for name, keep in self.masks.items()}

    def load_state_dict(self, state: dict) -> None:
        self.masks = {name: unpack_bits(entry["bits"], entry["shape"]) for name, entry in state.items()}
