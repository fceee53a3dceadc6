"""Recovery training options of ``CausalLM``: Elsa's optimizer (betas, linear lr decay), distillation from the
dense model (the loss against a KL written out by hand), and a resumed distillation run equal to an uninterrupted
one."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mosaic_lightning import CausalLM, MosaicPruning
from mosaic_lightning.recovery.distillation import distillation_loss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _loader() -> DataLoader:
    ids = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(1))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=2)


def _trainer(callbacks=(), max_steps: int = 4) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=list(callbacks), logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def test_distillation_loss_is_the_kl_written_out_by_hand():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    temperature = 2.0
    kl = 0.0
    for s_row, t_row in zip(student.reshape(-1, 11), teacher.reshape(-1, 11), strict=True):
        p_t = torch.exp(t_row / temperature) / torch.exp(t_row / temperature).sum()
        p_s = torch.exp(s_row / temperature) / torch.exp(s_row / temperature).sum()
        kl += float((p_t * (p_t.log() - p_s.log())).sum())
    expected = kl / 10 * temperature**2
    assert float(distillation_loss(student, teacher, temperature)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


PRUNINGS = {
    "masked": {"sparsity": 0.5},
    "compacted before training": {"sparsity": 0.3, "structured_fraction": 1.0, "uniform_structure": True,
                                  "whole_units": True, "compact_before_training": True},
}  # fmt: skip


@pytest.mark.parametrize("pruning", sorted(PRUNINGS))
def test_distillation_loss_of_a_fit_is_the_kl_to_the_dense_model_as_loaded(tiny_model_dir, pruning):
    """The teacher is the model as loaded (dense): after pruning, the step-0 loss is the KL between the pruned
    (or compacted) and the dense model's logits on that batch, computed here from a second, unpruned load."""
    module = CausalLM(str(tiny_model_dir), learning_rate=1e-3, distill_weight=1.0, distill_temperature=1.5)
    losses = _Losses()
    prune = MosaicPruning(method="magnitude", allocation="uniform", verbose=False, **PRUNINGS[pruning])
    first = next(iter(_loader()))["input_ids"]
    pruned_logits = {}

    class _FirstLogits(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                with torch.no_grad():
                    pruned_logits["value"] = pl_module.model(input_ids=first, use_cache=False).logits

    _trainer([prune, _FirstLogits(), losses], max_steps=3).fit(module, _loader())
    dense = CausalLM(str(tiny_model_dir))
    dense.configure_model()
    with torch.no_grad():
        dense_logits = dense.model(input_ids=first, use_cache=False).logits
    expected = float(distillation_loss(pruned_logits["value"], dense_logits, 1.5))
    assert expected > 1e-5  # pruning moved the student away from the teacher
    assert losses.losses[0] == pytest.approx(expected, rel=1e-4)


def test_linear_lr_decay_to_zero_without_warmup_and_elsa_betas(tiny_model_dir):
    module = CausalLM(str(tiny_model_dir), learning_rate=2e-4, betas=(0.9, 0.95), lr_schedule="linear")
    seen = []

    class _Lr(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]))

    _trainer([_Lr()], max_steps=4).fit(module, _loader())
    assert [lr for lr, _ in seen] == pytest.approx([2e-4 * (1 - s / 4) for s in range(4)])
    assert all(betas == (0.9, 0.95) for _, betas in seen)


class _ModesSeen(L.Callback):
    def __init__(self) -> None:
        self.modes: set[bool] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.update(module.training for module in pl_module.model.modules())


@pytest.mark.parametrize("compact_before_training", [False, True])
def test_the_model_trains_in_train_mode(tiny_model_dir, compact_before_training):
    """transformers loads a model in eval mode; every module, compacted ones included, trains in train mode
    (dropout on)."""
    module = CausalLM(str(tiny_model_dir), distill_weight=1.0)
    seen = _ModesSeen()
    pruning = MosaicPruning(sparsity=0.3, method="magnitude", allocation="uniform", structured_fraction=1.0,
                            uniform_structure=True, whole_units=True, compact_before_training=True)  # fmt: skip
    callbacks = [seen, pruning] if compact_before_training else [seen]
    _trainer(callbacks, max_steps=2).fit(module, _loader())
    assert seen.modes == {True}


def test_linear_lr_decay_with_zero_training_steps_fits(tiny_model_dir):
    """``--trainer.max_steps 0`` (prune and export only) with the linear schedule: nothing to decay over."""
    module = CausalLM(str(tiny_model_dir), lr_schedule="linear")
    trainer = _trainer([], max_steps=0)
    trainer.fit(module, _loader())
    assert trainer.global_step == 0


def _distill_run(model_dir, ckpt_path=None, save_at=None, path=None) -> CausalLM:
    torch.manual_seed(0)
    module = CausalLM(str(model_dir), learning_rate=1e-3, distill_weight=0.5, lr_schedule="linear")
    callbacks = [MosaicPruning(sparsity=0.5, method="magnitude", allocation="uniform", verbose=False)]
    if save_at is not None:

        class _Save(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == save_at:
                    trainer.save_checkpoint(path)

        callbacks.append(_Save())
    _trainer(callbacks, max_steps=8).fit(module, _loader(), ckpt_path=ckpt_path)
    return module


def test_resumed_distillation_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    # Four batches per epoch: the checkpoint at step 4 falls on an epoch boundary (a plain DataLoader restarts
    # its epoch on resume).
    full = _distill_run(tiny_model_dir, save_at=4, path=tmp_path / "mid.ckpt")
    resumed = _distill_run(tiny_model_dir, ckpt_path=tmp_path / "mid.ckpt")
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"betas": (0.9, 1.5)}, "betas="), ({"lr_schedule": "cosine"}, "lr_schedule='cosine'"),
     ({"distill_weight": 1.5}, "distill_weight=1.5"), ({"distill_weight": float("nan")}, "distill_weight=nan"),
     ({"distill_temperature": 0}, "distill_temperature=0")],
)  # fmt: skip
def test_bad_training_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        CausalLM(**kwargs)


def test_linear_lr_decay_holds_under_admm_step_wrapper(tiny_model_dir):
    """ADMM adds its penalty inside the optimizer's step (after clipping); the linear schedule must still step
    (Lightning warns that the step was overridden after the scheduler was built)."""
    from mosaic_lightning.schedules import ADMM

    module = CausalLM(str(tiny_model_dir), learning_rate=2e-4, lr_schedule="linear")
    pruning = MosaicPruning(sparsity=0.5, method="magnitude", allocation="uniform", schedule=ADMM(projection_every=2),
                            verbose=False)  # fmt: skip
    seen = []

    class _Lr(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    _trainer([pruning, _Lr()], max_steps=4).fit(module, _loader())
    assert seen == pytest.approx([2e-4 * (1 - s / 4) for s in range(4)])
