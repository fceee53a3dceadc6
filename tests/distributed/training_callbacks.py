"""Run by tests/test_distributed_training.py as its own process tree: the training-time callbacks
on 2 CPU ranks (gloo) under DDP or DeepSpeed ZeRO-2/3.

``python training_callbacks.py OUT STRATEGY MODE`` with STRATEGY ``ddp``, ``zero2`` or ``zero3`` and MODE

* ``lora``: composite MosaicPruning + LoRARecovery (adapter saved) + CompactOnFitEnd (export), 3 steps, with a
  checkpoint after step 2 that a fresh Trainer then resumes. Written per rank: masks, structure, the adapter and
  base weights after step 2 and right before the merge (gathered: test-only), what the live model is after fit,
  and the resumed run's starting weights. Rank 0's CompactOnFitEnd writes OUT/export, LoRARecovery OUT/adapter.
* ``gradual``: MosaicPruning with a Gradual schedule re-pruned at steps 0, 1, 2 from each rank's recent batches.
* ``admm``: MosaicPruning with the ADMM schedule (z/u steps every step, hard prune at step 3), 5 steps.
* ``shrink``: MosaicPruning with ``compact_before_training`` (whole units, uniform), then 3 DDP training steps on
  the compacted model: its weights, the structure and the optimizer's parameter count per rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported (as cpu_deepspeed does too)
os.environ.setdefault("DS_BUILD_OPS", "0")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from conftest import TinyLM  # noqa: E402
from ddp_prune import calibration  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mosaic_lightning import CompactOnFitEnd, LoRARecovery, MosaicPruning  # noqa: E402
from mosaic_lightning.core.masks import canonical_name  # noqa: E402
from mosaic_lightning.core.zero import gathered_params, is_partitioned  # noqa: E402
from mosaic_lightning.schedules import ADMM, Gradual  # noqa: E402

LORA_A = "model.layers.0.self_attn.q_proj.lora_A.default.weight"


def _strategy(name: str):
    if name == "ddp":
        return "ddp"
    from cpu_deepspeed import CpuDeepSpeedStrategy, zero_config

    return CpuDeepSpeedStrategy(config=zero_config(int(name.removeprefix("zero"))))


def _gathered_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, by canonical name (test-only: gathers the whole tiny model; all ranks call)."""
    params = dict(model.named_parameters())
    with gathered_params(params.values()):
        return {canonical_name(n): p.detach().clone() for n, p in params.items()}


class BeforeMerge(L.Callback):
    """Snapshots base and adapter weights after step 2, at train start and at train end (listed before
    LoRARecovery, so before its merge)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.at_step_2: dict[str, torch.Tensor] = {}
        self.at_start: dict[str, torch.Tensor] = {}
        self.lora_partitioned = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_start = _gathered_weights(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2 and not self.at_step_2:
            self.at_step_2 = _gathered_weights(pl_module.model)

    def on_train_end(self, trainer, pl_module) -> None:
        self.weights = _gathered_weights(pl_module.model)
        lora_a = next(p for n, p in pl_module.model.named_parameters() if canonical_name(n) == LORA_A)
        self.lora_partitioned = is_partitioned(lora_a) and lora_a.data.numel() == 0


def run_lora(out: Path, strategy: str, trainer_kwargs: dict) -> dict:
    pruning = MosaicPruning(sparsity=0.5, method="wanda", allocation="uniform", structured_fraction=0.5,
                            uniform_structure=True, calibration_dataloader=calibration(), verbose=False)  # fmt: skip
    spy = BeforeMerge()
    lora = LoRARecovery(r=4, alpha=8, adapter_dir=str(out / "adapter"))
    compact = CompactOnFitEnd(export_dir=str(out / "export"))
    module = TinyLM(lr=5e-2)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(callbacks=[pruning, spy, lora, compact, checkpoints],
                        **{**trainer_kwargs, "enable_checkpointing": True})  # fmt: skip
    trainer.fit(module, _train_loader())
    fresh = {**trainer_kwargs, "strategy": _strategy(strategy)}  # a strategy instance serves one Trainer
    resumed = _resume_lora(out / "checkpoints" / "epoch=0-step=2.ckpt", fresh)
    return {
        "resumed": resumed,
        "at_step_2": spy.at_step_2,
        "rank": trainer.global_rank,
        "masks": {n: k.clone() for n, k in pruning.masks.masks.items()},
        "structure": pruning.structure,
        "calibration": pruning.report.calibration,
        "before_merge": spy.weights,
        "lora_partitioned": spy.lora_partitioned,
        "live_type": type(module.model).__name__,
        "compacted_here": compact.model is not None,
    }


def _resume_lora(checkpoint: Path, trainer_kwargs: dict) -> dict:
    """A fresh module (other init) and callbacks resumed from the step-2 checkpoint: the adapter is attached in
    setup, before the strategy restores it; what the first train step starts from must be the checkpoint."""
    torch.manual_seed(1)
    pruning = MosaicPruning(sparsity=0.5, method="wanda", allocation="uniform", structured_fraction=0.5,
                            uniform_structure=True, calibration_dataloader=calibration(), verbose=False)  # fmt: skip
    spy = BeforeMerge()
    trainer = L.Trainer(callbacks=[pruning, spy, LoRARecovery(r=4, alpha=8)], **trainer_kwargs)
    trainer.fit(TinyLM(lr=5e-2), _train_loader(), ckpt_path=checkpoint)
    return {"at_start": spy.at_start, "masks": {n: k.clone() for n, k in pruning.masks.masks.items()},
            "global_step": trainer.global_step}  # fmt: skip


def run_gradual(out: Path, strategy: str, trainer_kwargs: dict) -> dict:
    schedule = Gradual(initial_sparsity=0.2, start_step=0, end_step=2, every_n_steps=1, calibration_batches=2)
    result = _run_schedule(strategy, trainer_kwargs, schedule, "mosaic")
    result["last_pruned_step"] = schedule.last_pruned_step
    return result


def run_admm(out: Path, strategy: str, trainer_kwargs: dict) -> dict:
    schedule = ADMM(rho=1.0, projection_every=1, start_step=0, end_step=3)
    result = _run_schedule(strategy, trainer_kwargs, schedule, "owl", method="magnitude")
    result["z_steps"] = result["report"]["admm_z_steps"]
    return result


def _run_schedule(strategy: str, trainer_kwargs: dict, schedule, allocation: str, **kwargs) -> dict:
    kwargs = {"method": "wanda"} | kwargs
    pruning = MosaicPruning(sparsity=0.5, allocation=allocation, schedule=schedule, verbose=False, **kwargs)
    module = TinyLM()
    trainer = L.Trainer(callbacks=[pruning], **trainer_kwargs)
    trainer.fit(module, _train_loader())
    result = {"rank": trainer.global_rank, "masks": {n: k.clone() for n, k in pruning.masks.masks.items()},
              "visible": _gathered_weights(module.model), "report": dict(pruning.report.metrics)}  # fmt: skip
    if strategy != "ddp":
        from deepspeed.utils import safe_get_full_fp32_param

        params = {canonical_name(n): p for n, p in module.model.named_parameters()}
        result["master"] = {n: safe_get_full_fp32_param(params[n]).detach().clone() for n in pruning.masks.masks}
    return result


def run_shrink(out: Path, strategy: str, trainer_kwargs: dict) -> dict:
    pruning = MosaicPruning(sparsity=0.3, method="wanda", allocation="uniform", structured_fraction=1.0,
                            uniform_structure=True, whole_units=True, compact_before_training=True, verbose=False,
                            calibration_dataloader=calibration())  # fmt: skip
    module = TinyLM()
    dense_params = module.model.num_parameters()
    trainer = L.Trainer(callbacks=[pruning], **trainer_kwargs)
    trainer.fit(module, _train_loader())
    optimizer_params = sum(p.numel() for group in trainer.optimizers[0].param_groups for p in group["params"])
    return {"rank": trainer.global_rank, "visible": _gathered_weights(module.model), "structure": pruning.structure,
            "dense_params": dense_params, "params": module.model.num_parameters(),
            "optimizer_params": optimizer_params}  # fmt: skip


def _train_loader() -> DataLoader:
    data = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(5))
    return DataLoader(data, batch_size=2)


def main(out: Path, strategy: str, mode: str) -> None:
    torch.manual_seed(0)
    trainer_kwargs = dict(accelerator="cpu", devices=2, strategy=_strategy(strategy), logger=False,
                          max_steps={"lora": 3, "gradual": 4, "admm": 5, "shrink": 3}[mode], enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    runs = {"lora": run_lora, "gradual": run_gradual, "admm": run_admm, "shrink": run_shrink}
    result = runs[mode](out, strategy, trainer_kwargs)
    torch.save(result, out / f"rank{result['rank']}.pt")
    # Leave together: a rank that exits while the other still runs a collective aborts in gloo's threads.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
