"""The ADMM solver alone (no trainer, no callback): each formula against an independent computation written out
here (hand-written projections, autograd of the penalty, the scaled-form updates of Boyd et al.), the solver on a
problem whose answer is known, and the solver's model-level steps on hand-written ``[out, in]`` views."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BUILDERS, TARGET_PARAMS

from mosaic_lightning.core.adapters import ModelAdapter
from mosaic_lightning.core.patterns import parse_pattern
from mosaic_lightning.recovery.admm import (
    ADMMSolver,
    objective_scores,
    penalty_gradient,
    penalty_weight,
    rescale_dual,
    sparse_projection,
    z_u_update,
)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hand_keep(scores: torch.Tensor, num_prune: int, pattern: str) -> torch.Tensor:
    """Keep mask written out without the library: ``unstructured-layer`` drops the ``num_prune`` smallest scores
    of the whole tensor; ``2:4`` keeps the two largest of every 4 consecutive inputs (``num_prune`` = half)."""
    if pattern == "unstructured-layer":
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        keep[scores.flatten().argsort()[:num_prune]] = False
        return keep.view_as(scores)
    assert pattern == "2:4" and num_prune == scores.numel() // 2
    groups = scores.reshape(scores.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.view_as(scores)


def _out_in_views(model, arch: str) -> dict[str, torch.Tensor]:
    """``[out, in]`` views of the targeted weights, written out by hand (Conv1D transposed, c_attn split in 3)."""
    return _out_in(dict(model.named_parameters()), arch)


def _out_in(params: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """``[out, in]`` views of parameter-shaped tensors by parameter name (the weights, or their moments)."""
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


# -- the projection -------------------------------------------------------------------------------------
def test_projection_layer_scope_prunes_exactly_the_smallest():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    z, keep = sparse_projection(x, 77, parse_pattern("unstructured-layer"))
    assert int((~keep).sum()) == 77
    smallest = set(sorted(range(x.numel()), key=lambda i: abs(float(x.flatten()[i])))[:77])
    assert {i for i in range(x.numel()) if not keep.flatten()[i]} == smallest
    assert torch.equal(z, torch.where(keep, x, torch.zeros_like(x)))


def test_projection_row_scope_is_the_nearest_point_with_those_counts():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    z, keep = sparse_projection(x, 77, parse_pattern("unstructured"))
    per_row = (~keep).sum(dim=1)
    assert int(per_row.sum()) == 77
    assert sorted(per_row.tolist()) == [9] * 3 + [10] * 5  # 77 = 8 * 9 + 5
    for r in range(8):  # within a row, every pruned |x| is below every kept one
        assert x[r][~keep[r]].abs().max() < x[r][keep[r]].abs().min()
    # Independently: the least removed energy with 9 per row and 5 rows at 10 takes each row's 9 smallest plus
    # the 5 smallest 10th-smallest values.
    sq = [sorted(float(v) ** 2 for v in row) for row in x]
    optimum = sum(sum(row[:9]) for row in sq) + sum(sorted(row[9] for row in sq)[:5])
    assert float((x - z).square().sum()) == pytest.approx(optimum, rel=1e-6)


def test_projection_2_of_4_keeps_the_two_largest_per_group():
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    z, keep = sparse_projection(x, 6 * 16 // 2, parse_pattern("2:4"))
    groups, kept = x.abs().reshape(6, 4, 4), keep.reshape(6, 4, 4)
    assert (kept.sum(dim=-1) == 2).all()
    top2 = groups.topk(2, dim=-1).indices
    expected = torch.zeros_like(kept).scatter_(-1, top2, True)
    assert torch.equal(kept, expected)
    assert torch.equal(z, x * keep)


@pytest.mark.parametrize("pattern", ["unstructured-layer", "2:4"])
def test_projection_is_the_nearest_point_of_the_set(pattern):
    """No other point of the set (random supports with the same counts) is nearer to ``x`` than its projection."""
    x = _randn(4, 8, seed=3)
    num_prune = 16
    z, _ = sparse_projection(x, num_prune, parse_pattern(pattern))
    nearest = float((x - z).square().sum())
    g = torch.Generator().manual_seed(4)
    for _ in range(200):
        other = _hand_keep(torch.rand(x.shape, generator=g), num_prune, pattern)
        assert float((x - x * other).square().sum()) >= nearest


def test_objective_scores_keep_the_largest_second_moment_times_square():
    x, v = _randn(6, 8, seed=5), torch.rand(6, 8, generator=torch.Generator().manual_seed(6))
    scores = objective_scores(x, v.double())
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, (v * x * x), rtol=1e-6, atol=0)
    z, keep = sparse_projection(x, 30, parse_pattern("unstructured-layer"), scores)
    assert torch.equal(keep, _hand_keep(v * x * x, 30, "unstructured-layer"))
    assert not torch.equal(keep, _hand_keep(x.abs(), 30, "unstructured-layer"))  # v changed the support


# -- the penalty, the z/u update, the dual's rescaling --------------------------------------------------
def test_penalty_gradient_is_the_autograd_gradient_of_the_penalty():
    w, z, u = _randn(5, 8, seed=7).requires_grad_(), _randn(5, 8, seed=8), _randn(5, 8, seed=9)
    rho = 0.37
    (rho / 2 * (w - z + u).square().sum()).backward()
    with torch.no_grad():
        got = penalty_gradient(w, z, u, rho)
    torch.testing.assert_close(got, w.grad, rtol=1e-6, atol=1e-7)
    assert not any(t.data_ptr() == got.data_ptr() for t in (w, z, u))  # a new tensor: inputs untouched


@pytest.mark.parametrize("pattern", ["unstructured-layer", "2:4"])
def test_z_u_update_is_the_scaled_form_of_boyd_et_al(pattern):
    w, u = _randn(4, 16, seed=10), 0.3 * _randn(4, 16, seed=11)
    w0, u0 = w.clone(), u.clone()
    num_prune = 32
    z_new, u_new = z_u_update(w, u, num_prune, parse_pattern(pattern))
    # Z^{k+1} = Proj_S(W^{k+1} + U^k), U^{k+1} = U^k + W^{k+1} - Z^{k+1} (Boyd et al. 2011, section 3.1.1).
    x = w0 + u0
    expected_z = torch.where(_hand_keep(x.abs(), num_prune, pattern), x, torch.zeros(()))
    assert torch.equal(z_new, expected_z)
    torch.testing.assert_close(u_new, u0 + w0 - expected_z, rtol=1e-6, atol=1e-6)  # kept: U + W - (W + U) ~ 0
    assert torch.equal(w, w0) and torch.equal(u, u0)  # new tensors: a checkpoint being written keeps its copies


def test_z_u_update_with_a_second_moment_projects_by_v_times_square():
    w, u, v = _randn(4, 16, seed=12), 0.3 * _randn(4, 16, seed=13), torch.rand(4, 16)
    z_new, u_new = z_u_update(w, u, 40, parse_pattern("unstructured-layer"), v)
    x = w + u
    expected_z = torch.where(_hand_keep(v * x * x, 40, "unstructured-layer"), x, torch.zeros(()))
    assert torch.equal(z_new, expected_z)
    torch.testing.assert_close(u_new, u + w - expected_z, rtol=1e-6, atol=1e-6)


def test_u_step_in_a_fixed_point_leaves_everything_in_place():
    """W already in S with U = 0 is a fixed point: Z = W, U stays 0."""
    w = torch.where(_hand_keep(_randn(4, 8, seed=14).abs(), 12, "unstructured-layer"), _randn(4, 8, seed=14), 0.0)
    z, u = z_u_update(w, torch.zeros_like(w), 12, parse_pattern("unstructured-layer"))
    assert torch.equal(z, w) and torch.equal(u, torch.zeros_like(w))


def test_rescaled_dual_keeps_the_unscaled_dual():
    u = _randn(3, 5, seed=15)
    new = rescale_dual(u, 0.2, 0.7)
    torch.testing.assert_close(0.7 * new, 0.2 * u, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("pattern", ["unstructured-layer", "2:4"])
def test_admm_on_a_least_squares_problem_reaches_its_known_solution(pattern):
    """min 1/2 ||W - A||^2 s.t. W in S has the answer Proj_S(A). Exact x-steps (closed form
    W = (A + rho (Z - U)) / (1 + rho)) with the module's z/u updates converge there, and to the fixed point
    U = (A - Z) / rho the optimality condition predicts."""
    a, rho, num_prune = _randn(4, 16, seed=16), 1.0, 32
    p = parse_pattern(pattern)
    z, u = torch.zeros_like(a), torch.zeros_like(a)
    for _ in range(200):
        w = (a + rho * (z - u)) / (1 + rho)
        z, u = z_u_update(w, u, num_prune, p)
    answer = torch.where(_hand_keep(a.abs(), num_prune, pattern), a, torch.zeros(()))
    assert torch.equal(z != 0, answer != 0)
    torch.testing.assert_close(z, answer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((a + rho * (z - u)) / (1 + rho), answer, rtol=1e-5, atol=1e-6)  # W = Z
    torch.testing.assert_close(u, (a - answer) / rho, rtol=1e-5, atol=1e-6)


# -- the penalty weight's schedules ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schedule", "step", "total", "expected"),
    [("constant", 3, 10, 0.5), ("linear", 3, 10, 0.1 + 0.4 * 0.3),
     ("cosine", 3, 10, 0.1 + 0.4 * (1 - math.cos(0.3 * math.pi)) / 2), ("exponential", 3, 10, 0.1 * 5**0.3),
     ("linear", 0, 10, 0.1), ("linear", 10, 10, 0.5), ("linear", 15, 10, 0.5), ("cosine", -2, 10, 0.1),
     ("linear", 3, 0, 0.5)],
)  # fmt: skip
def test_penalty_weight_follows_the_written_out_schedules(schedule, step, total, expected):
    assert penalty_weight(schedule, 0.1, 0.5, step, total) == pytest.approx(expected, rel=1e-12)


def test_exponential_from_zero_starts_at_1e_minus_12():
    assert penalty_weight("exponential", 0.0, 0.5, 0, 10) == pytest.approx(1e-12)
    assert penalty_weight("exponential", 0.0, 0.5, 5, 10) == pytest.approx((1e-12 * 0.5) ** 0.5)


# -- the solver on a model's projections ----------------------------------------------------------------
def _solver_on(arch: str, rho: float = 0.3) -> tuple[torch.nn.Module, ADMMSolver, str]:
    """A solver started on a tiny model (llama per tensor at 80%, GPT-2's fused and transposed layout at 2:4),
    its U set to a random nonzero value so every term of the updates matters."""
    model = BUILDERS[arch]()
    pattern = "2:4" if arch == "gpt2" else "unstructured-layer"
    adapter = ModelAdapter(model)
    counts = {p.key: p.numel // 2 if arch == "gpt2" else round(0.8 * p.numel) for p in adapter.all_projections()}
    solver = ADMMSolver(0.01, counts=counts)
    solver.start(adapter, parse_pattern(pattern), rho)
    g = torch.Generator().manual_seed(17)
    solver.u = {k: 0.01 * torch.randn(u.shape, generator=g) for k, u in solver.u.items()}
    return model, solver, pattern


def _hand_weights(model, arch: str) -> dict[str, torch.Tensor]:
    """Hand-written views by projection key (the adapter's order matches TARGET_PARAMS', checked here)."""
    keys = [p.key for p in ModelAdapter(model).all_projections()]
    views = list(_out_in_views(model, arch).values())
    assert len(keys) == len(views)
    return {k: v.detach().float().clone() for k, v in zip(keys, views, strict=True)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_start_projects_the_weights_with_a_zero_dual(arch):
    model = BUILDERS[arch]()
    adapter, pattern = ModelAdapter(model), "2:4" if arch == "gpt2" else "unstructured-layer"
    counts = {p.key: p.numel // 2 if arch == "gpt2" else round(0.8 * p.numel) for p in adapter.all_projections()}
    solver = ADMMSolver(0.01, counts=counts)
    solver.start(adapter, parse_pattern(pattern), 0.25)
    assert solver.rho == 0.25 and solver.num_projections == 0
    for key, w in _hand_weights(model, arch).items():
        assert torch.equal(solver.z[key], torch.where(_hand_keep(w.abs(), counts[key], pattern), w, 0.0)), key
        assert torch.equal(solver.u[key], torch.zeros_like(w))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_penalty_grad_in_the_parameters_layout_is_autograds(arch):
    model, solver, _ = _solver_on(arch)
    model.zero_grad()
    loss_grads = {}
    for name, param in model.named_parameters():
        param.grad = _randn(*param.shape, seed=len(name))  # an existing loss gradient the penalty adds to
        loss_grads[name] = param.grad.clone()
    solver.add_penalty_grad(ModelAdapter(model), scale=4.0)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    views = _out_in_views(model, arch)
    keys = [p.key for p in ModelAdapter(model).all_projections()]
    penalty = sum((w - solver.z[k] + solver.u[k]).square().sum() for w, k in zip(views.values(), keys, strict=True))
    (4.0 * solver.rho / 2 * penalty).backward()
    for name, param in model.named_parameters():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(got[name], loss_grads[name] + expected, rtol=1e-5, atol=1e-6, msg=name)
    assert sum(1 for p in model.parameters() if p.grad is not None) == len(TARGET_PARAMS[arch])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_z_u_step_applies_the_update_to_every_projection(arch):
    model, solver, pattern = _solver_on(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # as if the optimizer had moved W
    weights, old_u = _hand_weights(model, arch), dict(solver.u)
    solver.z_u_step(ModelAdapter(model), parse_pattern(pattern))
    for key, w in weights.items():
        x = w + old_u[key]
        assert torch.equal(solver.z[key], torch.where(_hand_keep(x.abs(), solver.counts[key], pattern), x, 0.0))
        torch.testing.assert_close(solver.u[key], old_u[key] + w - solver.z[key], rtol=1e-6, atol=1e-8)
    assert solver.num_projections == 1


def test_z_u_step_and_supports_with_second_moments_read_them_in_the_parameters_layout():
    """GPT-2 stores ``[in, out]``: the moment of the parameter goes through the same view as the weight."""
    model, solver, _ = _solver_on("gpt2")
    pattern = parse_pattern("2:4")
    params = dict(model.named_parameters())
    moments = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for i, (name, p) in
               enumerate(params.items())}  # fmt: skip
    by_param = {id(p): moments[n] for n, p in params.items()}
    moment_views = dict(zip(_hand_weights(model, "gpt2"), _out_in(moments, "gpt2").values(), strict=True))
    weights, old_u = _hand_weights(model, "gpt2"), dict(solver.u)
    solver.z_u_step(ModelAdapter(model), pattern, lambda proj: by_param[id(proj.weight)])
    for key, w in weights.items():
        x = w + old_u[key]
        keep = _hand_keep(moment_views[key] * x * x, solver.counts[key], "2:4")
        assert torch.equal(solver.z[key], torch.where(keep, x, 0.0)), key
    keeps = solver.supports(ModelAdapter(model), pattern, lambda proj: by_param[id(proj.weight)])
    for key, w in weights.items():
        assert torch.equal(keeps[key], _hand_keep(moment_views[key] * w * w, solver.counts[key], "2:4")), key


def test_set_rho_rescales_u_and_a_same_rho_leaves_it():
    _, solver, _ = _solver_on("llama", rho=0.3)
    old_u = dict(solver.u)
    solver.set_rho(0.3)
    assert all(solver.u[k] is old_u[k] for k in old_u)
    solver.set_rho(1.2)
    assert solver.rho == 1.2
    for key, u in old_u.items():
        torch.testing.assert_close(1.2 * solver.u[key], 0.3 * u, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_supports_keep_the_projection_of_w_not_of_w_plus_u(arch):
    model, solver, pattern = _solver_on(arch)
    solver.u = {k: 10 * u for k, u in solver.u.items()}  # a large U would move the support of Proj(W + U)
    keeps = solver.supports(ModelAdapter(model), parse_pattern(pattern))
    weights = _hand_weights(model, arch)
    for key, w in weights.items():
        assert torch.equal(keeps[key], _hand_keep(w.abs(), solver.counts[key], pattern)), key
    assert any(
        not torch.equal(keeps[k], _hand_keep((w + solver.u[k]).abs(), solver.counts[k], pattern))
        for k, w in weights.items()
    )


def test_diagnostics_are_the_written_out_residual_and_agreement():
    model, solver, pattern = _solver_on("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    solver.num_projections = 3
    keeps = solver.supports(ModelAdapter(model), parse_pattern(pattern))
    weights = _hand_weights(model, "llama")
    gap = sum(float((w - solver.z[k]).square().sum()) for k, w in weights.items())
    norm = sum(float(w.square().sum()) for w in weights.values())
    agree = sum(int((keeps[k] & (solver.z[k] != 0)).sum()) for k in weights)
    kept = sum(int(keeps[k].sum()) for k in weights)
    got = solver.diagnostics(ModelAdapter(model), keeps)
    assert got["admm_z_steps"] == 3
    assert got["admm_primal_residual"] == pytest.approx(math.sqrt(gap / norm), rel=1e-9)
    assert got["admm_support_agreement"] == pytest.approx(agree / kept, rel=1e-12)
    assert 0 < got["admm_support_agreement"] < 1  # W moved: the supports differ somewhere, agree mostly
    solver.release()
    assert solver.z == {} and solver.u == {}
    assert ADMMSolver(0.1).diagnostics(ModelAdapter(model), keeps) == {"admm_z_steps": 0}
