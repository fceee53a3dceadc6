"""TEST-ONLY: Lightning's ``DeepSpeedStrategy`` on CPU processes over gloo (no GPU needed).

Lightning refuses DeepSpeed without CUDA, and hands DeepSpeed ``root_device.index`` (None on CPU) as the device
rank. This subclass lifts exactly those two restrictions; everything else (ZeRO partitioning, fp32 master weights,
optimizer state, checkpointing) is DeepSpeed's own code path. Import it only after :func:`cpu_environment`.
"""

from __future__ import annotations

import argparse
import os

# DeepSpeed picks its accelerator at import time: force the CPU one and never JIT-build C++ ops (shm comm,
# CPUAdam, FusedAdam) on a fresh machine. Must run before ``import deepspeed``.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("DS_SKIP_CUDA_CHECK", "1")

from lightning.fabric.plugins.environments import LightningEnvironment  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402  (re-exported for scripts)

__all__ = ["CpuDeepSpeedStrategy", "TrainerFn", "zero_config"]


def zero_config(stage: int, offload: bool = False) -> dict:
    """A ZeRO config for tiny models on CPU: partition every parameter, accept a torch optimizer."""
    zero: dict = {"stage": stage}
    if stage == 3:
        # Default thresholds keep small parameters whole on every rank; 0 partitions everything.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.Adam: no FusedAdam/CPUAdam build
        "zero_force_ds_cpu_optimizer": False,  # offload with a torch optimizer instead of DeepSpeedCPUAdam
        "train_micro_batch_size_per_gpu": 2,
    }


class CpuDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy for CPU processes (gloo): test-only."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        kwargs.setdefault("cluster_environment", LightningEnvironment())
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:  # skip the "only supported on CUDA GPUs" check
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:  # CPU devices have no index to validate against local ranks
        import deepspeed
        from lightning.fabric.utilities.seed import reset_seed

        # The shared-memory all-reduce op is JIT-compiled at process-group start unless marked unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        parameters = [p for p in model.parameters() if p.requires_grad]
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # root_device.index is None on CPU
            config=self.config,
            model=model,
            model_parameters=parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer
