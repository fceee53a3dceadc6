"""Run by tests/test_distributed.py as its own process tree: Lightning DDP on CPU (gloo), 2 ranks.

Each rank writes its masks, its pruned weights after training and the calibration batches it saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TinyLM  # noqa: E402

from mosaic_lightning import MosaicPruning  # noqa: E402


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(4)]


def main(out: Path, method: str, allocation: str = "mosaic", structured_fraction: str = "0",
         true_sequential: str = "0") -> None:  # fmt: skip
    torch.manual_seed(0)
    module = TinyLM()
    callback = MosaicPruning(sparsity=0.5, method=method, allocation=allocation, calibration_dataloader=calibration(),
                             structured_fraction=float(structured_fraction), true_sequential=true_sequential == "1",
                             verbose=False)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, callbacks=[callback],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    data = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(5))
    trainer.fit(module, DataLoader(data, batch_size=2))
    torch.save(
        {
            "masks": {name: keep.clone() for name, keep in callback.masks.masks.items()},
            "weights": {name: p.detach().clone() for name, p in module.model.named_parameters()},
            "world_size": trainer.world_size,
            "allocation": callback.report.allocation,
            "structure": callback.structure,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
