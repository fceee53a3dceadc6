"""DeepSpeed ZeRO support, kept in one place: partitioned parameters, one-module gathering, fp32 master masks.

Under ZeRO-3 every rank holds only a flat slice of each parameter (``p.ds_tensor``; ``p.data`` is empty and
``p.ds_shape`` the real shape). The engine reads and writes weights one module at a time inside
:func:`gathered`; forwards go through DeepSpeed's own fetch/release hooks. Every rank computes the same
result from all-reduced statistics, and what is written inside a modifying gather is broadcast from rank 0
and re-partitioned on exit, so ranks cannot drift.

Under ZeRO-1/2/3 the optimizer steps fp32 *master* partitions and copies them into the visible weights
afterwards, so zeroing the visible weights alone is undone by the next step. :func:`sync_master_` writes a
pruned parameter into its master once, and :func:`mask_parameter_` zeroes pruned entries in the visible weight,
the master and the Adam moments after every step. Both touch only this rank's own partitions (no collectives),
so they run on every rank, and both are no-ops beyond the visible weight for parameters DeepSpeed does not
manage: :meth:`~mosaic_lightning.core.masks.MaskStore.enforce_` is the one mask path for every strategy.

Nothing here imports DeepSpeed unless it is already loaded: plain and DDP runs never pay for it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 managed parameter (its values live in ``ds_tensor`` slices, gathered on demand)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's real shape, also while ZeRO-3 has partitioned it away (``param.shape == (0,)``)."""
    return param.ds_shape if is_partitioned(param) else param.shape


@contextmanager
def gathered(*modules: nn.Module, modify: bool = False):
    """Whole tensors of these modules' own parameters for the duration (ZeRO-3; a no-op otherwise).

    With ``modify`` the values written inside are broadcast from rank 0 and re-partitioned on exit; callers
    write the same values on every rank. Only the given modules are gathered, never the whole model.
    """
    with gathered_params([p for m in modules for p in m.parameters(recurse=False)], modify=modify):
        yield


@contextmanager
def gathered_params(params: Iterable[torch.Tensor], modify: bool = False):
    """:func:`gathered` for explicit parameters."""
    partitioned = list({id(p): p for p in params if is_partitioned(p)}.values())
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def deepspeed_engine(trainer) -> object | None:
    """The trainer's DeepSpeed engine once the strategy has set it up, else None (DeepSpeed is not imported)."""
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is None:
        return None
    model = getattr(trainer.strategy, "model", None)
    return model if isinstance(model, deepspeed.DeepSpeedEngine) else None


def is_deepspeed_managed(param: torch.Tensor) -> bool:
    """A parameter a ZeRO optimizer steps through an fp32 master: a ZeRO-3 partition, or under ZeRO-1/2 a
    parameter with an ``_hp_mapping`` attribute (None on ranks that own no fragment of it, which still take part
    in assembling it)."""
    return hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping")


def full_fp32(param: torch.Tensor) -> torch.Tensor:
    """The whole fp32 value the optimizer steps: DeepSpeed's fp32 master, assembled from every rank's share (a
    collective: all ranks call, in the same order), else the parameter itself as fp32."""
    if is_deepspeed_managed(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).view(full_shape(param))
    if is_partitioned(param):
        raise RuntimeError("a ZeRO-3 parameter without an optimizer (frozen?) has no fp32 master to read")
    return param.detach().float()


def add_to_grad_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``grad += value`` (``value`` whole, shaped like the parameter). Under DeepSpeed the reduced fp32 gradient
    lives in the optimizer's partitions: it is assembled (a collective) and each rank writes back its share; call
    after backward at an accumulation boundary, before the step."""
    if is_deepspeed_managed(param):
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        grad = safe_get_full_grad(param).view(full_shape(param))
        safe_set_full_grad(param, grad.float() + value.to(grad.device))
        return
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    param.grad.add_(value.to(param.grad.dtype))


@torch.no_grad()
def sync_master_(param: torch.Tensor) -> None:
    """After pruning under DeepSpeed: copy the pruned visible weight (SparseGPT also changes kept ones) into its
    fp32 master partition (a no-op for a parameter DeepSpeed does not step). With bf16/fp16 weights this rounds
    the master to the visible precision once, which is what pruning saw."""
    if is_partitioned(param):
        if hasattr(param, "_z3_optimizer"):
            from deepspeed.utils import safe_set_local_fp32_param

            safe_set_local_fp32_param(param, param.ds_tensor.detach().float())
    elif getattr(param, "_hp_mapping", None) is not None:
        from deepspeed.utils import safe_set_full_fp32_param

        # ZeRO-1/2 keep the full visible weight on every rank; this writes only the rank's own fragment.
        safe_set_full_fp32_param(param, param.detach().float())


@torch.no_grad()
def mask_parameter_(param: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero pruned entries of one parameter: this rank's visible share and, under DeepSpeed, its fp32 master and
    Adam moments."""
    if is_partitioned(param):
        _mask_zero3(param, keep)
        return
    param.data.masked_fill_(~keep.to(param.device), 0)
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        _mask_zero12(mapping, keep)


def _mask_zero12(mapping, keep: torch.Tensor) -> None:
    """ZeRO-1/2: this rank owns one contiguous fragment of the flattened parameter in the fp32 master and in
    every optimizer state tensor (linked after the first step). In-place, no collective."""
    address = mapping.lp_fragment_address
    drop = ~keep.flatten().narrow(0, address.start, address.numel)
    for key in (None, *(mapping.optim_fragment or {})):
        fragment = mapping.get_hp_fragment(key)
        fragment.masked_fill_(drop.to(fragment.device), 0)


def mask_partition_(param: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """ZeRO-3: zero pruned entries of this rank's visible slice (``ds_tensor``: slice ``rank`` of the flattened
    parameter, zero-padded at the end); returns the slice's drop mask."""
    local = param.ds_tensor
    size = local.numel()
    rank = _partition_rank(param)
    flat = keep.flatten().to(local.device)
    flat = torch.cat([flat, flat.new_ones(max(0, size * (rank + 1) - flat.numel()))])
    drop = ~flat.narrow(0, size * rank, size)
    local.data.view(-1).masked_fill_(drop, 0)
    return drop


def _mask_zero3(param: torch.Tensor, keep: torch.Tensor) -> None:
    """ZeRO-3: the visible slice, then the same slice of the fp32 master and of the Adam moments."""
    from deepspeed.utils import (
        safe_get_local_fp32_param,
        safe_get_local_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    drop = mask_partition_(param, keep)
    if not hasattr(param, "_z3_optimizer"):  # inference engine or frozen parameter: no master copy
        return
    master = safe_get_local_fp32_param(param)
    if master is not None:
        safe_set_local_fp32_param(param, master.masked_fill(drop.to(master.device), 0))
    for key in MOMENT_KEYS:
        try:
            state = safe_get_local_optimizer_state(param, key)
        except KeyError:  # optimizer state is created at the first step
            continue
        if state is not None:
            safe_set_local_optimizer_state(param, state.masked_fill(drop.to(state.device), 0), key)


def _partition_rank(param: torch.Tensor) -> int:
    import deepspeed.comm as dist

    optimizer = getattr(param, "_z3_optimizer", None)
    if optimizer is not None:
        return optimizer._get_param_partition_rank(param)
    return dist.get_rank(group=getattr(param, "ds_process_group", None))
