"""ADMM schedule (Elsa): the solver's steps at the right moments of a fit (penalty gradient, z/u updates, lambda
schedule, objective-aware projection driven through the hooks), exact final sparsity that holds under further Adam
steps, resume equality, bad input. The solver's formulas alone: ``test_admm_solver.py``."""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch
from conftest import BUILDERS, TARGET_PARAMS, TinyLM
from torch.utils.data import DataLoader

from mosaic_lightning import MosaicPruning
from mosaic_lightning.core.adapters import ModelAdapter
from mosaic_lightning.core.patterns import parse_pattern
from mosaic_lightning.pruning.engine import plan_pruning
from mosaic_lightning.schedules import ADMM, sparse_projection

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _tiny_lm(arch: str = "llama", **kwargs) -> TinyLM:
    """In train mode: the ADMM tests train with the models' dropout on."""
    return TinyLM(BUILDERS[arch], train_mode=True, **kwargs)


def _loader() -> DataLoader:
    """Four batches per epoch, so a checkpoint at step 4 falls on an epoch boundary."""
    data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    return DataLoader(data, batch_size=2)


def _trainer(callbacks: list, max_steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def _callback(schedule: ADMM, **kwargs) -> MosaicPruning:
    kwargs = {"sparsity": 0.8, "method": "magnitude", "allocation": "uniform", "verbose": False} | kwargs
    return MosaicPruning(schedule=schedule, **kwargs)


def _fake_trainer(step: int = 0, accumulate: int = 1) -> types.SimpleNamespace:
    """What the schedule's hooks read from a trainer, for driving them by hand."""
    return types.SimpleNamespace(global_step=step, accumulate_grad_batches=accumulate, strategy=None, optimizers=[])


def _out_in_views(model, arch: str) -> dict[str, torch.Tensor]:
    """``[out, in]`` views of the targeted weights, written out by hand (Conv1D transposed, c_attn split in 3)."""
    params = dict(model.named_parameters())
    if arch == "llama":
        return {name: params[name] for name in TARGET_PARAMS["llama"]}
    views = {}
    for name in TARGET_PARAMS["gpt2"]:
        w = params[name].t()
        if name.endswith("c_attn.weight"):
            size = w.shape[0] // 3
            views.update({f"{name}[{i}]": w[i * size : (i + 1) * size] for i in range(3)})
        else:
            views[name] = w
    return views


def _keys_in_order(model) -> list[str]:
    return [p.key for p in ModelAdapter(model).all_projections()]


# -- the counts ------------------------------------------------------------------------------------------
def test_admm_counts_from_the_engine_planner_are_exact_for_uniform_and_outlier_allocations(llama):
    adapter = ModelAdapter(llama)
    total = sum(p.numel for p in adapter.all_projections())
    uniform = plan_pruning(llama, adapter, [], _callback(ADMM()).config)  # uniform reads no calibration data
    assert sum(uniform.counts.values()) == round(0.8 * total) and not uniform.ratios
    assert all(abs(uniform.counts[p.key] - 0.8 * p.numel) <= 1 for p in adapter.all_projections())
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))]
    config = _callback(ADMM(), allocation="mosaic", max_sparsity=0.95).config
    mosaic = plan_pruning(llama, adapter, batches, config)
    assert sum(mosaic.counts.values()) == round(0.8 * total) and set(mosaic.ratios) == set(mosaic.counts)


# -- the ADMM steps, driven by hand ----------------------------------------------------------------------
def _started(arch: str, rho: float = 0.3) -> tuple[TinyLM, MosaicPruning, ADMM]:
    """A schedule started on a tiny model, with a random nonzero U so every term of the updates matters."""
    module, schedule = _tiny_lm(arch), ADMM(rho=rho, projection_every=2)
    pattern, sparsity = ("2:4", 0.5) if arch == "gpt2" else ("unstructured", 0.8)
    callback = _callback(schedule, pattern=pattern, sparsity=sparsity)
    schedule.on_train_batch_start(callback, _fake_trainer(0), module.model, None)
    g = torch.Generator().manual_seed(5)
    schedule.solver.u = {k: 0.01 * torch.randn(u.shape, generator=g) for k, u in schedule.u.items()}
    return module, callback, schedule


def _loss_grads(module: TinyLM) -> dict[str, torch.Tensor]:
    module.model.zero_grad()
    torch.manual_seed(11)  # the same dropout draws on every call
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    module.training_step(ids, 0).backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_penalty_gradient_is_rho_times_w_minus_z_plus_u(arch):
    module, callback, schedule = _started(arch)
    plain = _loss_grads(module)
    _loss_grads(module)
    schedule.solver.add_penalty_grad(ModelAdapter(module.model))
    with_penalty = {n: p.grad.clone() for n, p in module.model.named_parameters()}

    # Autograd of the explicit penalty rho/2 sum ||W - Z + U||^2 over the hand-written [out, in] views.
    module.model.zero_grad()
    views = _out_in_views(module.model, arch)
    keys = _keys_in_order(module.model)
    assert len(views) == len(keys)
    penalty = sum((w - schedule.z[k] + schedule.u[k]).square().sum() for w, k in zip(views.values(), keys, strict=True))
    (schedule.rho / 2 * penalty).backward()
    for name, param in module.model.named_parameters():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(with_penalty[name] - plain[name], expected, rtol=1e-5, atol=1e-7, msg=name)
    assert any(float(p.grad.abs().max()) > 0 for p in module.model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_z_and_u_updates(arch):
    module, callback, schedule = _started(arch)
    pattern = callback.config.parsed_pattern
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # as if the optimizer had moved W
    views = _out_in_views(module.model, arch).values()
    weights = {k: w.detach().float() for k, w in zip(_keys_in_order(module.model), views, strict=True)}
    old_z, old_u = dict(schedule.z), dict(schedule.u)

    schedule.on_train_batch_end(callback, _fake_trainer(1), module.model)  # not a projection step
    assert all(schedule.z[k] is old_z[k] and schedule.u[k] is old_u[k] for k in old_z)
    schedule.on_train_batch_end(callback, _fake_trainer(2), module.model)
    for key, w in weights.items():
        x = w + old_u[key]
        keep = pattern.keep_mask(x.abs(), schedule.counts[key])
        torch.testing.assert_close(schedule.z[key], torch.where(keep, x, torch.zeros_like(x)), rtol=0, atol=0)
        torch.testing.assert_close(schedule.u[key], old_u[key] + w - schedule.z[key], rtol=1e-6, atol=1e-8)
    assert schedule.num_projections == 1

    # Gradient accumulation: more batches ending on step 2 must not project again.
    z_after = dict(schedule.z)
    schedule.on_train_batch_end(callback, _fake_trainer(2), module.model)
    assert all(schedule.z[k] is z_after[k] for k in z_after) and schedule.num_projections == 1


# -- in a real fit --------------------------------------------------------------------------------------
class _Spy(L.Callback):
    """Zero fraction of the targeted weights after every batch, and a weight snapshot at one step."""

    def __init__(self, snapshot_step: int) -> None:
        self.snapshot_step, self.zero_fractions, self.snapshot = snapshot_step, [], {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.model.named_parameters())
        zeros = sum(int((params[n] == 0).sum()) for n in TARGET_PARAMS["llama"])
        self.zero_fractions.append(zeros / sum(params[n].numel() for n in TARGET_PARAMS["llama"]))
        if trainer.global_step == self.snapshot_step:
            self.snapshot = {n: params[n].detach().clone() for n in TARGET_PARAMS["llama"]}


def test_fit_prunes_exactly_at_end_step_and_pruned_weights_stay_zero_under_adam():
    callback, spy = _callback(ADMM(rho=0.5, projection_every=2, end_step=4)), _Spy(snapshot_step=4)
    module = _tiny_lm()
    trainer = _trainer([callback, spy], max_steps=8)
    trainer.fit(module, _loader())

    assert spy.zero_fractions[:3] == [0.0, 0.0, 0.0]  # dense during ADMM
    params = dict(module.model.named_parameters())
    total = sum(params[n].numel() for n in TARGET_PARAMS["llama"])
    assert set(callback.masks.masks) == set(TARGET_PARAMS["llama"])
    assert callback.masks.num_pruned() == round(0.8 * total)
    optimizer = trainer.optimizers[0]
    for name in TARGET_PARAMS["llama"]:
        keep = callback.masks.masks[name]
        assert int((params[name] == 0).sum()) == int((~keep).sum())  # the zeros are exactly the pruned set
        assert abs(int((~keep).sum()) - 0.8 * keep.numel()) <= 1
        assert torch.equal(spy.snapshot[name] == 0, ~keep)  # pruned at step 4 ...
        assert not torch.equal(params[name][keep], spy.snapshot[name][keep])  # ... then 4 more Adam steps
        for moment in ("exp_avg", "exp_avg_sq"):
            assert (optimizer.state[params[name]][moment][~keep] == 0).all()
    assert spy.zero_fractions[3:] == [pytest.approx(round(0.8 * total) / total, abs=0)] * 5
    report = callback.report
    assert report.achieved_sparsity == round(0.8 * total) / total  # exact counts: 0.8 up to one weight
    assert all(p.requested_sparsity == p.achieved_sparsity for p in report.projections)
    assert report.metrics["admm_z_steps"] == 2


def test_admm_pulls_the_pruned_weights_to_zero():
    """With a strong penalty the weights outside Z's support shrink, so the hard prune removes little."""
    schedule = ADMM(rho=5.0, projection_every=2)
    callback = _callback(schedule)
    module = _tiny_lm(optimizer=torch.optim.SGD, lr=0.1)
    trainer = _trainer([callback], max_steps=8)
    trainer.fit(module, _loader())
    assert callback.report.metrics["admm_primal_residual"] < 0.2
    assert callback.report.metrics["admm_support_agreement"] > 0.9


def test_gpt2_two_of_four_after_fit():
    callback = _callback(ADMM(rho=0.5, projection_every=1), sparsity=0.5, pattern="2:4")
    module = _tiny_lm("gpt2")
    _trainer([callback], max_steps=3).fit(module, _loader())
    for view in _out_in_views(module.model, "gpt2").values():
        kept = (view != 0).reshape(view.shape[0], -1, 4).sum(dim=-1)
        assert (kept == 2).all()
    assert callback.report.achieved_sparsity == 0.5


# -- resume ---------------------------------------------------------------------------------------------
class _Killed(Exception):
    pass


class _SaveAndDie(L.Callback):
    """Saves a checkpoint after ``step`` optimizer steps (as ModelCheckpoint would), then kills the run."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise _Killed


def _run(ckpt_path=None, kill=None, **kwargs) -> tuple[TinyLM, MosaicPruning]:
    torch.manual_seed(0)
    callback = _callback(ADMM(rho=0.5, projection_every=3), **kwargs)
    module = _tiny_lm()
    trainer = _trainer([callback] + ([kill] if kill else []), max_steps=8)
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return module, callback


def test_resume_mid_admm_equals_uninterrupted_run(tmp_path):
    full, full_cb = _run()
    with pytest.raises(_Killed):
        _run(kill=_SaveAndDie(4, tmp_path / "mid.ckpt"))
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if "MosaicPruning" in k)["schedule"]
    assert state["started_at"] == 0 and state["num_projections"] == 1 and not state["finished"]
    assert any(float(u.abs().max()) > 0 for u in state["u"].values())  # mid-ADMM: a live residual to restore

    resumed, resumed_cb = _run(ckpt_path=tmp_path / "mid.ckpt")
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert resumed_cb.masks.masks.keys() == full_cb.masks.masks.keys()
    for name, keep in full_cb.masks.masks.items():
        assert torch.equal(resumed_cb.masks.masks[name], keep)
    assert resumed_cb.report.metrics["admm_z_steps"] == full_cb.report.metrics["admm_z_steps"] == 2
    with pytest.raises(ValueError, match=r"other MosaicPruning options \(targets=None there, \['q', 'k'\] here\)"):
        _run(ckpt_path=tmp_path / "mid.ckpt", targets=["q", "k"])


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rho": 0.0}, "rho=0.0"),
        ({"rho": -1}, "rho=-1"),
        ({"rho": float("nan")}, "rho=nan"),
        ({"rho": True}, "rho=True"),
        ({"projection_every": 0}, "projection_every=0"),
        ({"projection_every": 2.5}, "projection_every=2.5"),
        ({"start_step": -1}, "start_step=-1"),
        ({"start_step": 5, "end_step": 5}, "end_step=5"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        ADMM(**kwargs)
    assert field in str(info.value) and ("allowed values" in str(info.value) or "must be" in str(info.value))


@pytest.mark.parametrize(
    ("schedule", "kwargs", "message"),
    [
        (ADMM(end_step=50), {}, "end_step=50 lies outside the run"),
        (ADMM(start_step=10), {}, "start_step=10 leaves no step"),
        (ADMM(), {"sparsity": 0.5, "structured_fraction": 0.3}, "structured_fraction=0.3"),
    ],
)
def test_runs_it_cannot_do_fail_before_any_step(schedule, kwargs, message):
    module = _tiny_lm()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(ValueError, match=message):
        _trainer([_callback(schedule, **kwargs)], max_steps=10).fit(module, _loader())
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_frozen_weights_are_refused():
    module = _tiny_lm()
    module.model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="down_proj is frozen"):
        _trainer([_callback(ADMM())], max_steps=4).fit(module, _loader())


# -- Elsa as published: penalty after clipping, accumulation, lambda schedule, objective-aware projection ----
class _StepSpy(L.Callback):
    """Weights, gradients (before Lightning clips them) and the ADMM state at the first optimizer step, and the
    weights after it."""

    def __init__(self, schedule: ADMM) -> None:
        self.schedule, self.before, self.grads, self.after, self.z, self.u = schedule, {}, {}, {}, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}
            self.z, self.u = dict(self.schedule.z), dict(self.schedule.u)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and not self.after:
            self.after = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def test_penalty_joins_after_gradient_clipping_so_clipping_never_scales_it():
    lr, rho, max_norm = 0.1, 0.5, 1e-3
    schedule = ADMM(rho=rho, projection_every=100)
    spy = _StepSpy(schedule)
    module = _tiny_lm(optimizer=torch.optim.SGD, lr=lr)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, callbacks=[_callback(schedule), spy], logger=False,
                        gradient_clip_val=max_norm, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, _loader())

    total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in spy.grads.values()]))
    clip = min(1.0, max_norm / (float(total_norm) + 1e-6))
    assert clip < 0.01  # clipping is active: a clipped penalty would be 100x smaller
    penalty = {}
    for name, key in zip(TARGET_PARAMS["llama"], _keys_in_order(module.model), strict=True):
        penalty[name] = rho * (spy.before[name] - spy.z[key] + spy.u[key])
    for name, before in spy.before.items():
        expected = before - lr * (clip * spy.grads[name] + penalty.get(name, 0))
        torch.testing.assert_close(spy.after[name], expected, rtol=1e-5, atol=1e-7, msg=name)
    assert any(float(p.abs().max()) > 0 for p in penalty.values())


def _accumulated_run(batch_size: int, accumulate: int) -> tuple[TinyLM, MosaicPruning]:
    torch.manual_seed(0)
    data = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(3))
    callback = _callback(ADMM(rho=0.3, projection_every=2), pattern="unstructured-layer")
    module = TinyLM(BUILDERS["llama"], lr=1e-2)  # eval mode: no dropout, so batches split exactly
    trainer = L.Trainer(accelerator="cpu", max_steps=4, accumulate_grad_batches=accumulate, callbacks=[callback],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=batch_size))
    return module, callback


def test_gradient_accumulation_gives_the_trajectory_of_one_big_batch():
    big, big_cb = _accumulated_run(batch_size=4, accumulate=1)
    split, split_cb = _accumulated_run(batch_size=2, accumulate=2)
    for name, value in big.state_dict().items():
        torch.testing.assert_close(split.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert split_cb.report.metrics["admm_z_steps"] == big_cb.report.metrics["admm_z_steps"] == 2
    params = dict(split.model.named_parameters())
    zeros = {name: int((params[name] == 0).sum()) for name in TARGET_PARAMS["llama"]}
    for name, count in zeros.items():  # per-tensor projection: each tensor holds exactly its planned count
        assert count == split_cb.masks.masks[name].numel() - int(split_cb.masks.masks[name].sum())
        assert abs(count - 0.8 * params[name].numel()) < 1
    assert sum(zeros.values()) == round(0.8 * sum(params[n].numel() for n in zeros))


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [("constant", 0.4), ("linear", 0.1 + 0.3 * 0.25), ("cosine", 0.1 + 0.3 * 0.5 * (1 - 2**-0.5)),
     ("exponential", 0.1 * 4**0.25)],
)  # fmt: skip
def test_lambda_schedule_values_and_u_rescaled_by_old_over_new(schedule, expected):
    module = _tiny_lm()
    admm = ADMM(rho=0.4, projection_every=2, end_step=8, rho_schedule=schedule, rho_start=0.1)
    callback = _callback(admm)
    admm.on_train_batch_start(callback, _fake_trainer(0), module.model, None)
    first = 0.4 if schedule == "constant" else 0.1
    assert admm.current_rho == pytest.approx(first)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = dict(zip(_keys_in_order(module.model), _out_in_views(module.model, "llama").values(), strict=True))
    old_u = dict(admm.u)
    admm.on_train_batch_end(callback, _fake_trainer(2), module.model)  # z/u step at step 2 of 8
    assert admm.current_rho == pytest.approx(expected)
    for key, w in weights.items():
        unscaled = old_u[key] + w.detach() - admm.z[key]
        torch.testing.assert_close(admm.u[key], unscaled * (first / expected), rtol=1e-6, atol=1e-8)


def test_objective_aware_projection_keeps_the_largest_second_moment_times_square():
    module = _tiny_lm()
    admm = ADMM(rho=0.3, projection_every=2, projection="objective")
    callback = _callback(admm, pattern="unstructured-layer")
    optimizer = torch.optim.Adam(module.model.parameters())
    g = torch.Generator().manual_seed(9)
    for p in module.model.parameters():
        optimizer.state[p]["exp_avg_sq"] = torch.rand(p.shape, generator=g)
    trainer = _fake_trainer(0)
    trainer.optimizers = [optimizer]
    admm.on_train_batch_start(callback, trainer, module.model, None)
    params = dict(module.model.named_parameters())
    admm.on_train_batch_end(callback, _fake_trainer(2), module.model)
    for name, key in zip(TARGET_PARAMS["llama"], _keys_in_order(module.model), strict=True):
        x = params[name].detach()  # U = 0 before the first z/u step
        scores = (optimizer.state[params[name]]["exp_avg_sq"] * x.square()).flatten()
        kept = torch.zeros_like(scores, dtype=torch.bool)
        kept[scores.argsort(descending=True)[: scores.numel() - admm.counts[key]]] = True
        torch.testing.assert_close(admm.z[key], torch.where(kept.view_as(x), x, 0), rtol=0, atol=0)
    magnitude = sparse_projection(x, admm.counts[key], parse_pattern("unstructured-layer"))[0]
    assert not torch.equal(admm.z[key], magnitude)  # the second moment changed the support


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"rho_schedule": "step"}, "rho_schedule='step'"), ({"rho_start": -0.1}, "rho_start=-0.1"),
     ({"projection": "taylor"}, "projection='taylor'")],
)  # fmt: skip
def test_bad_elsa_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        ADMM(**kwargs)
