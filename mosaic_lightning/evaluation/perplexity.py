"""Perplexity on held-out windows with torchmetrics: ``exp(mean NLL)`` over every predicted token.

The loss is computed a chunk of tokens at a time from the model's final hidden states (:func:`score_hidden`):
the full ``[batch, seq, vocab]`` logits of a window are never held at once, which for a 262k vocabulary
(Gemma 3) is most of an evaluation's peak memory.

With ``distributed=True`` (DDP, DeepSpeed) every rank scores its share of the batches and torchmetrics sums the
totals over ranks at ``compute``, so the result is the single-process one and no rank repeats another's work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from ..core.adapters import unwrap_peft
from ..core.zero import is_partitioned

LOGIT_CHUNK_VALUES = 1 << 24  # logits held at once while scoring (64 MB in float32)


def update_perplexity(metric: Perplexity, logits: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Score token ``t+1`` from positions ``<= t``: the same tokens HF's shifted causal-LM loss uses."""
    metric.update(logits[:, :-1].float(), input_ids[:, 1:])


def score_hidden(model: nn.Module, metric: Perplexity, hidden: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Add one window's tokens to ``metric`` from its final hidden states ``[batch, seq, d]`` (after the final
    norm), a chunk of positions at a time through the output embedding (and Gemma 2's logit soft-capping)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    step = max(1, LOGIT_CHUNK_VALUES // (head.out_features * hidden.shape[0]))
    for start in range(0, hidden.shape[1] - 1, step):
        stop = min(start + step, hidden.shape[1] - 1)
        logits = head(hidden[:, start:stop]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        metric.update(logits, input_ids[:, start + 1 : stop + 1])


def _score(model: nn.Module, metric: Perplexity, input_ids: torch.Tensor) -> None:
    """Chunked where the model is a base model plus an output embedding (every family the adapters know); any
    other model through its full logits. Under a peft wrapper (LoRA recovery), the wrapped model's."""
    model = unwrap_peft(model)
    base = getattr(model, "base_model", None)
    if base is None or base is model or model.get_output_embeddings() is None:
        update_perplexity(metric, model(input_ids=input_ids, use_cache=False).logits, input_ids)
        return
    hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state
    score_hidden(model, metric, hidden, input_ids)


@torch.no_grad()
def perplexity(
    model: nn.Module, batches: Iterable, progress: bool = True, desc: str = "perplexity", distributed: bool = False
) -> float:
    """Perplexity of a causal LM over ``batches`` (tensors of ``input_ids`` or dicts holding them).

    ``distributed``: every rank of ``torch.distributed`` calls this with the same batches; rank ``r`` of ``w``
    scores batches ``r, r + w, ...`` and the totals are summed. Every rank runs the same number of forwards (a
    rank whose share is one shorter repeats a batch without scoring it), because a ZeRO-3 forward gathers each
    layer from all ranks and would hang if one rank stopped early. Without it (the default) the calling process
    scores every batch alone, also inside a distributed job.
    """
    batches = [batch["input_ids"] if isinstance(batch, dict) else batch for batch in batches]
    if not batches:
        raise ValueError("perplexity: no evaluation batches")
    rank, world = _rank_and_world() if distributed else (0, 1)
    device = _device(model)
    metric = Perplexity(sync_on_compute=distributed).to(device)
    was_training = model.training
    model.eval()
    try:
        for step in tqdm(range(math.ceil(len(batches) / world)), desc=desc, disable=not progress or rank != 0):
            index = step * world + rank
            ids = batches[min(index, len(batches) - 1)].to(device)
            if index < len(batches):
                _score(model, metric, ids)
            else:  # the same forwards on every rank (ZeRO-3 gathers), not scored
                _score(model, Perplexity().to(device), ids)
    finally:
        model.train(was_training)
    return float(metric.compute())  # distributed: sums the totals over ranks


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("perplexity(distributed=True) needs an initialised torch.distributed process group")
    return dist.get_rank(), dist.get_world_size()


def _device(model: nn.Module) -> torch.device:
    """Where inputs go: the parameters' device; under ZeRO-3 (parameters may be offloaded) the rank's
    accelerator, where DeepSpeed gathers them."""
    param = next(model.parameters())
    if is_partitioned(param):
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return param.device
