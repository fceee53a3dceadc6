"""Schedules: values at given steps, pruning inside the training loop, resume equality, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TARGET_PARAMS, ResumableBatches, TinyLM
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from mosaic_lightning import MosaicPruning
from mosaic_lightning.schedules import Gradual, OneShot, cubic_sparsity


def _loader() -> DataLoader:
    data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    return DataLoader(data, batch_size=2)


def _trainer(callback, max_steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[callback], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def _zero_fraction(model) -> float:
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in TARGET_PARAMS["llama"])
    return zeros / sum(params[n].numel() for n in TARGET_PARAMS["llama"])


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 0.1, 0.7, 0, 100) == 0.1
    assert cubic_sparsity(100, 0.1, 0.7, 0, 100) == 0.7
    assert cubic_sparsity(150, 0.1, 0.7, 0, 100) == 0.7
    assert cubic_sparsity(50, 0.1, 0.7, 0, 100) == pytest.approx(0.7 + (0.1 - 0.7) * 0.5**3)
    values = [cubic_sparsity(t, 0.0, 0.8, 10, 60) for t in range(0, 70, 5)]
    assert values == sorted(values)  # monotone; steepest early, as GMP intends
    assert values[3] - values[2] > values[-3] - values[-4]


def test_gradual_steps_and_sparsities():
    schedule = Gradual(initial_sparsity=0.2, start_step=2, end_step=10, every_n_steps=3)
    assert schedule.pruning_steps() == [2, 5, 8, 10]
    assert schedule.sparsity_at(2, 0.6) == pytest.approx(0.2)
    assert schedule.sparsity_at(10, 0.6) == pytest.approx(0.6)


def _gradual_callback() -> MosaicPruning:
    schedule = Gradual(initial_sparsity=0.2, start_step=1, end_step=7, every_n_steps=2)
    return MosaicPruning(sparsity=0.6, method="wanda", allocation="uniform", verbose=False, schedule=schedule)


def test_gradual_prunes_during_training_and_ends_at_final_sparsity():
    callback = _gradual_callback()
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(round(_zero_fraction(pl_module.model), 3))

    module = TinyLM()
    trainer = _trainer(callback, max_steps=10)
    trainer.callbacks.append(Spy())
    trainer.fit(module, _loader())
    assert seen[0] == 0.0  # nothing pruned before start_step
    assert seen[1] == pytest.approx(0.2, abs=2e-3)
    assert seen == sorted(seen)  # sparsity only rises
    assert seen[-1] == pytest.approx(0.6, abs=2e-3)
    assert abs(callback.report.achieved_sparsity - 0.6) < 1e-3


def test_oneshot_at_step_prunes_then_holds():
    callback = MosaicPruning(sparsity=0.5, method="wanda", allocation="uniform", verbose=False,
                             schedule=OneShot(at_step=3), num_calibration_samples=4)  # fmt: skip
    module = TinyLM()
    _trainer(callback, max_steps=6).fit(module, _loader())
    assert _zero_fraction(module.model) == pytest.approx(0.5, abs=1e-3)


def _run(max_steps: int, ckpt_path=None, checkpoint_dir=None):
    torch.manual_seed(0)
    callback = _gradual_callback()
    module = TinyLM()
    trainer = _trainer(callback, max_steps=max_steps, enable_checkpointing=checkpoint_dir is not None,
                       default_root_dir=checkpoint_dir)  # fmt: skip
    if checkpoint_dir is not None:  # what a job that is later killed leaves behind: a checkpoint per epoch
        trainer.callbacks.append(
            ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
        )
    trainer.fit(module, ResumableBatches(), ckpt_path=ckpt_path)
    return module, callback


def test_gradual_resume_equals_uninterrupted_run(tmp_path):
    full, full_cb = _run(max_steps=10, checkpoint_dir=tmp_path)
    mid = tmp_path / "epoch=0-step=4.ckpt"  # after 4 of 10 steps: mid-schedule (ramp runs to step 7)
    resumed, resumed_cb = _run(max_steps=10, ckpt_path=mid)
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for name, keep in full_cb.masks.masks.items():
        assert torch.equal(resumed_cb.masks.masks[name], keep)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="initial_sparsity"):
        MosaicPruning(sparsity=0.3, schedule=Gradual(initial_sparsity=0.5))
    with pytest.raises(ValueError, match="start_step"):
        Gradual(start_step=10, end_step=5)
    with pytest.raises(ValueError, match="every_n_steps"):
        Gradual(every_n_steps=0)
    callback = MosaicPruning(sparsity=0.5, method="wanda", verbose=False, schedule=Gradual(start_step=0, end_step=50))
    with pytest.raises(ValueError, match="end_step=50 lies outside the run"):
        _trainer(callback, max_steps=10).fit(TinyLM(), _loader())
