"""Consolidation: the plain, pruned Hugging Face model on one rank's CPU, from a model that training left sharded
(DeepSpeed ZeRO-3 partitions) or wrapped (a peft LoRA wrapper, merged or not), gathered one module at a time.

Every rank calls :func:`consolidated_copy` (each gather is a collective); only the keeping rank builds the copy.
Peak memory is that CPU copy plus one gathered module on every rank's device: the whole model is never gathered on
a device. The live model is only read, so a DeepSpeed engine that still owns it stays intact.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapters import unwrap_peft
from .masks import MaskStore
from .zero import gathered_params


@torch.no_grad()
def consolidated_copy(model: nn.Module, masks: MaskStore | None, keep: bool) -> nn.Module | None:
    """A plain HF model on CPU equal to ``model`` with every LoRA adapter merged and ``masks`` applied
    (``W + mask ⊙ scale·B A``, the sparsity-keeping merge), on the rank with ``keep``; None on the others.

    Tied weights stay tied and buffers are copied; the copy's config is its own, so compacting the copy
    leaves the live model's config alone.
    """
    source = unwrap_peft(model)
    target = _empty_like(source) if keep else None
    copies: dict[int, nn.Parameter] = {}  # live parameter -> its copy, so tied weights map to one copy
    for name, module in source.named_modules():
        if _inside_lora_layer(name):
            continue  # read with its LoRA layer
        if _is_lora_layer(module):
            with gathered_params(module.parameters()):
                weight, bias = _merged_weight(module), module.get_base_layer().bias
                if target is not None:
                    into = target.get_submodule(name)
                    _put(into, "weight", weight, copies, key=id(module.get_base_layer().weight))
                    if bias is not None:
                        _put(into, "bias", bias, copies)
            continue
        own = {n: p for n, p in module.named_parameters(recurse=False)}
        with gathered_params(own.values()):
            if target is not None:
                into = target.get_submodule(name)
                for param_name, param in own.items():
                    _put(into, param_name, param, copies)
                for buffer_name, buffer in module.named_buffers(recurse=False):
                    into._buffers[buffer_name] = buffer.detach().to("cpu", copy=True)
    if target is None:
        return None
    _check_complete(target)
    if masks is not None:
        masks.enforce_(target)
    return target.eval()


def _empty_like(model: nn.Module) -> nn.Module:
    """The same architecture on the meta device (no memory, no init), with its own copy of the config."""
    with torch.device("meta"):
        empty = type(model)(copy.deepcopy(model.config))
    if getattr(model, "generation_config", None) is not None:
        empty.generation_config = copy.deepcopy(model.generation_config)
    return empty


def _put(module: nn.Module, name: str, value: torch.Tensor, copies: dict[int, nn.Parameter], key=None) -> None:
    key = id(value) if key is None else key
    if key not in copies:
        copies[key] = nn.Parameter(value.detach().to("cpu", copy=True), requires_grad=False)
    module._parameters[name] = copies[key]


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "get_delta_weight") and hasattr(module, "get_base_layer")


def _inside_lora_layer(name: str) -> bool:
    return any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))


def _merged_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight plus the active adapters' deltas, unless peft has merged them already."""
    weight = layer.get_base_layer().weight.detach()
    if layer.merged:
        return weight
    for adapter in layer.active_adapters:
        weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _check_complete(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"consolidation left tensors without values (not found in the live model): {left[:5]}")
