"""Run by tests/test_deepspeed.py as its own process tree: Lightning + DeepSpeed ZeRO on CPU (gloo), 2 ranks.

``python deepspeed_prune.py OUT STAGE METHOD ALLOCATION [offload] [nofix] [resume]``: prune at fit start, train
3 steps, and write per rank: masks, the visible weights (gathered) and fp32 master weights after training, how
ZeRO-3 partitioned q_proj. With ``resume``: save a ZeRO checkpoint, resume it for 2 more steps in a new Trainer
and convert it to a plain fp32 state dict. ``nofix`` replaces the master-weight masking with visible-weight
masking only, to show that the fix is needed. ``multinode``: 2 nodes x 1 device on loopback; the caller starts one
process per node with ``NODE_RANK`` set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported (as cpu_deepspeed does too)
os.environ.setdefault("DS_BUILD_OPS", "0")

import deepspeed  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from conftest import TinyLM  # noqa: E402
from cpu_deepspeed import CpuDeepSpeedStrategy, zero_config  # noqa: E402
from ddp_prune import calibration  # noqa: E402  (the same calibration data as the DDP tests)
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import mosaic_lightning.core.masks as mosaic_masks  # noqa: E402
from mosaic_lightning import MosaicPruning  # noqa: E402
from mosaic_lightning.core.masks import named_parameters  # noqa: E402
from mosaic_lightning.core.zero import gathered_params, is_partitioned, mask_partition_  # noqa: E402

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _trainer(stage: int, offload: bool, max_steps: int, callback: MosaicPruning, nodes: int, *extra) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2 // nodes, num_nodes=nodes, max_steps=max_steps,
                     strategy=CpuDeepSpeedStrategy(config=zero_config(stage, offload)), callbacks=[callback, *extra],
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=True)  # fmt: skip


def _snapshot(trainer: L.Trainer, module: TinyLM, masks) -> dict:
    """Visible weights (gathered), fp32 masters and Adam moments of the masked parameters; collectives, so every
    rank calls (the whole tiny model is gathered here, which the library itself never does)."""
    params = named_parameters(module.model)
    with gathered_params(params.values()):
        visible = {n: params[n].detach().clone() for n in masks}
    master = {n: safe_get_full_fp32_param(params[n]).detach().clone().view(visible[n].shape) for n in masks}
    moments = {}
    if trainer.global_step > 0:
        for key in ("exp_avg", "exp_avg_sq"):
            moments[key] = {n: safe_get_full_optimizer_state(params[n], key).detach().clone().view(visible[n].shape)
                            for n in masks}  # fmt: skip
    return {"visible": visible, "master": master, "moments": moments, "global_step": trainer.global_step}


class Probe(L.Callback):
    """Snapshots the model right after pruning, before the first optimizer step (runs after MosaicPruning)."""

    def __init__(self, callback: MosaicPruning) -> None:
        self.callback, self.at_start = callback, None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start is None:
            self.at_start = _snapshot(trainer, pl_module, self.callback.masks.masks)


def _visible_only(param, keep) -> None:  # what masking looked like before DeepSpeed support: visible weights only
    if is_partitioned(param):
        mask_partition_(param, keep)  # this rank's slice
    else:
        param.data.masked_fill_(~keep.to(param.device), 0)


def _no_master_sync(param) -> None:
    pass


def main(out: Path, stage: int, method: str, allocation: str, flags: set[str]) -> None:
    offload, nodes = "offload" in flags, 2 if "multinode" in flags else 1
    options = {"sparsity": 0.5, "method": method, "allocation": allocation, "verbose": False,
               "true_sequential": "true_sequential" in flags}  # fmt: skip
    if "nofix" in flags:
        mosaic_masks.mask_parameter_ = _visible_only
        mosaic_masks.sync_master_ = _no_master_sync
    data = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    module = TinyLM()
    callback = MosaicPruning(**options, calibration_dataloader=calibration())
    probe = Probe(callback)
    trainer = _trainer(stage, offload, 3, callback, nodes, probe)
    trainer.fit(module, DataLoader(data, batch_size=2))
    q = module.model.model.layers[0].self_attn.q_proj.weight
    optimizer = trainer.strategy.deepspeed_engine.optimizer
    result = {
        "world_size": trainer.world_size,
        "masks": {n: k.clone() for n, k in callback.masks.masks.items()},
        "partition": {
            "data_numel": q.data.numel(),
            "local_numel": q.ds_tensor.numel() if stage == 3 else q.numel(),
            "full_numel": q.ds_numel if stage == 3 else q.numel(),
        },  # fmt: skip
        "pruned": probe.at_start,
        "trained": _snapshot(trainer, module, callback.masks.masks),
        "offload": bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False)),
        "engine_type": type(trainer.strategy.deepspeed_engine).__name__,
        "allocation": callback.report.allocation,
    }
    if "resume" in flags:
        ckpt = out / "zero.ckpt"
        trainer.save_checkpoint(ckpt)
        torch.manual_seed(1)  # a different dense init: everything must come from the checkpoint
        module2, callback2 = TinyLM(), MosaicPruning(**options, calibration_dataloader=calibration())
        trainer2 = _trainer(stage, offload, 5, callback2, nodes)
        trainer2.fit(module2, DataLoader(data, batch_size=2), ckpt_path=ckpt)
        result["resumed_masks"] = {n: k.clone() for n, k in callback2.masks.masks.items()}
        result["resumed"] = _snapshot(trainer2, module2, callback2.masks.masks)
        trainer2.strategy.barrier()
        if trainer2.global_rank == 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="checkpoint")
            result["converted"] = {n: state[f"model.{n}"].clone() for n in callback.masks.masks}
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    deepspeed.comm.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], set(sys.argv[5:]))
