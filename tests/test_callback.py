"""MosaicPruning in a real (tiny, CPU) Lightning fit: masks hold through training, moments are cleared,
checkpoints round-trip the masks, and bad arguments fail at construction."""

from __future__ import annotations

import dataclasses
import warnings

import lightning as L
import pytest
import torch
from conftest import TARGET_PARAMS, TinyLM
from torch.utils.data import DataLoader, Dataset

from mosaic_lightning import MosaicPruning
from mosaic_lightning.callbacks import causal_lm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

TARGETS = TARGET_PARAMS["llama"]


class _Windows(Dataset):
    def __init__(self, n: int = 16, seq_len: int = 16) -> None:
        self.ids = torch.randint(0, 128, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def _tiny_lm() -> TinyLM:
    """In train mode, trained on the ``input_ids`` of :class:`_Windows` rows."""
    return TinyLM(train_mode=True)


class _Snapshot(L.Callback):
    """Weights right after MosaicPruning's on_train_start (pruned, before the first step)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def _trainer(max_steps: int, *callbacks) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _pruning() -> MosaicPruning:
    return MosaicPruning(sparsity=0.5, method="wanda", allocation="uniform", num_calibration_samples=4, verbose=False)


def _loader() -> DataLoader:
    return DataLoader(_Windows(), batch_size=2)


def _check_masked(module: TinyLM, callback: MosaicPruning, optimizer: torch.optim.Optimizer) -> None:
    params = dict(module.model.named_parameters())
    for name in TARGETS:
        keep = callback.masks.masks[name]
        param = params[name]
        assert (param[~keep] == 0).all(), name
        state = optimizer.state[param]
        for moment in ("exp_avg", "exp_avg_sq"):
            assert (state[moment][~keep] == 0).all(), (name, moment)
            assert (state[moment][keep] != 0).any(), (name, moment)  # the moments are live elsewhere


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One 5-step fit, shared by the tests below (module scope keeps the suite fast)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped, so set here too (see conftest._single_thread)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, pruning, snapshot = _tiny_lm(), _pruning(), _Snapshot()
            trainer = _trainer(5, pruning, snapshot)
            trainer.fit(module, _loader())
            masks_after_fit = {n: m.clone() for n, m in pruning.masks.masks.items()}
            ckpt = tmp_path_factory.mktemp("ckpt") / "pruned.ckpt"
            trainer.save_checkpoint(ckpt)
    finally:
        torch.set_num_threads(threads)
    return module, pruning, snapshot, trainer, masks_after_fit, ckpt


def test_fit_prunes_once_and_keeps_pruned_weights_zero(fitted):
    module, pruning, snapshot, trainer, _, _ = fitted
    assert trainer.global_step == 5
    assert set(pruning.masks.masks) == set(TARGETS)
    total = sum(m.numel() for m in pruning.masks.masks.values())
    assert pruning.masks.num_pruned() == total // 2
    assert pruning.report is not None and pruning.report.calibration["tokens"] == 4 * 16
    _check_masked(module, pruning, trainer.optimizers[0])

    # Training really moved the kept weights (so "pruned stay zero" is not vacuous).
    params = dict(module.model.named_parameters())
    for name in TARGETS:
        keep = pruning.masks.masks[name]
        assert (snapshot.weights[name][~keep] == 0).all()
        assert not torch.allclose(params[name][keep], snapshot.weights[name][keep])


def test_masks_do_not_change_during_training(fitted):
    _, pruning, snapshot, _, masks_after_fit, _ = fitted
    for name, keep in masks_after_fit.items():
        torch.testing.assert_close(pruning.masks.masks[name], keep, rtol=0, atol=0)
        # The mask is exactly the zero pattern the pruning left before the first step.
        torch.testing.assert_close(snapshot.weights[name] != 0, keep, rtol=0, atol=0)


def test_checkpoint_round_trip_resumes_with_same_masks(fitted):
    _, pruning, _, _, masks_after_fit, ckpt = fitted
    state = torch.load(ckpt, weights_only=True)  # plain containers only: loads without unpickling code
    saved = next(v for k, v in state["callbacks"].items() if "MosaicPruning" in k)
    assert saved["config"]["sparsity"] == 0.5
    assert all(entry["bits"].dtype == torch.uint8 for entry in saved["masks"].values())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, resumed = _tiny_lm(), _pruning()
        trainer = _trainer(8, resumed)
        trainer.fit(module, _loader(), ckpt_path=ckpt)

    assert trainer.global_step == 8
    # masks and report came from the checkpoint (no second pruning: its timings would differ)
    assert dataclasses.asdict(resumed.report) == dataclasses.asdict(pruning.report)
    assert resumed.masks is not pruning.masks
    assert set(resumed.masks.masks) == set(masks_after_fit)
    for name, keep in masks_after_fit.items():
        torch.testing.assert_close(resumed.masks.masks[name], keep, rtol=0, atol=0)
    _check_masked(module, resumed, trainer.optimizers[0])


def test_causal_lm_finds_the_hf_model():
    module = _tiny_lm()
    assert causal_lm(module) is module.model
    with pytest.raises(TypeError, match="self.model"):
        causal_lm(L.LightningModule())


BAD_ARGS = [
    ({"sparsity": 1.5}, "sparsity=1.5"),
    ({"sparsity": -0.1}, "sparsity=-0.1"),
    ({"sparsity": True}, "sparsity=True"),
    ({"method": "obs"}, "method='obs'"),
    ({"allocation": "layerwise"}, "allocation='layerwise'"),
    ({"pattern": "2x4"}, "pattern='2x4'"),
    ({"pattern": "2:4", "sparsity": 0.7}, "pattern='2:4'"),
    ({"pattern": "2:4", "sparsity": 0.5, "allocation": "mosaic"}, "allocation='mosaic'"),
    ({"min_sparsity": 0.8, "max_sparsity": 0.6}, "min_sparsity=0.8"),
    ({"max_sparsity": 1.0}, "max_sparsity=1.0"),
    ({"num_calibration_samples": 0}, "num_calibration_samples=0"),
]
BAD_ARGS += [
    pytest.param({"allocation": {"class_path": "mosaic", "init_args": {"threshold": 0.0}}}, "threshold=0.0"),
    pytest.param({"allocation": {"class_path": "owl", "init_args": {"lam": 0.7}}}, "lam=0.7"),
    pytest.param({"method": {"class_path": "sparsegpt", "init_args": {"blocksize": 0}}}, "blocksize=0"),
    pytest.param({"method": {"class_path": "sparsegpt", "init_args": {"damp": 0.0}}}, "damp=0.0"),
    pytest.param({"method": {"class_path": "sparsegpt", "init_args": {"mask_scope": "col"}}}, "mask_scope='col'"),
    pytest.param(
        {"method": "obs"},
        "method='obs'; allowed values: ['magnitude', 'random', 'sparsegpt', 'sparsellm', 'structprune', 'wanda']",
    ),
    pytest.param({"structure_lambda": float("nan")}, "structure_lambda=nan"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_ARGS)
def test_init_rejects_bad_args_naming_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError)) as info:
        MosaicPruning(**kwargs)
    assert field in str(info.value)
