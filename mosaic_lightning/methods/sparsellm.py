"""SparseLLM (Bai et al., 2024): a block's MLP pruned jointly through auxiliary variables, not one projection at a
time. Follows the reference code (github BaiTheBest/SparseLLM, ``llama_sparsellm`` and ``opt_sparsellm`` in
``model_utils.py``).

Per decoder block, on the calibration inputs the engine streams (the output of the blocks before, as pruned):

1. One pass records the MLP input ``X``, the dense MLP output ``Y``, the up output ``z``, the gate output ``s`` and
   the down input ``p`` (all ``N`` tokens), and every projection's Hessian.
2. q, k, v, o are pruned with SparseGPT at their planned counts.
3. For ``t`` in ``0 .. iterations - 1``:
   a. if ``t > 0``: refit ``W_up = z X^+``, ``W_gate = s X^+``, ``W_down = Y p^+``; the down Hessian becomes
      ``p p^T / N``;
   b. prune up, gate and down with SparseGPT (masks chosen anew each iteration);
   c. ``p = (beta W_down^T W_down + gamma I)^-1 (beta W_down^T Y + gamma act(s) * z)``;
   d. ``z = (W_up X + act(s) * p) / (act(s)^2 + 1)``;
   e. ``s``: ``s_steps`` passes of gradient steps (learning rate ``s_lr``, ``chunk_tokens`` tokens at a time) on
      ``alpha ||s - W_gate X||^2 + gamma ||p - act(s) * z||^2``, safeguarded (below).
4. The final weights are those of the last pruning step (3b).

``act`` is the model's own MLP activation, read from the MLP module (``act_fn``: SiLU for Llama, GELU-tanh for
Gemma; ``activation_fn``: ReLU for OPT), never a hard-coded SiLU.

Choices and deliberate differences from the reference:

- Pseudo-inverses through the Gram matrices, ``z X^+ = (z X^T)(X X^T)^+``, accumulated over token chunks in fp32:
  the same matrix, without an ``N x d`` inverse in memory; the reference computes ``pinverse`` in fp32 and then
  stores fp16 copies. Everything here stays fp32.
- The gate-output step is safeguarded (:func:`update_s_step`): the reference's fixed learning rate diverges
  where the up output is large (the pruned MLP's output error then ends far above SparseGPT's and the model is
  broken; see bench/RESULTS.md, section 'SparseLLM against SparseGPT and Wanda'). Each element's step is the
  reference's, capped at the inverse of its Gauss-Newton curvature, and is kept only where it lowers that
  element's objective.
- ``iterations`` applies to every block; the reference runs 1 iteration for blocks 1, 30 and 31 of LLaMA-7B.
- Exact counts: every projection loses exactly its planned count (any allocation works, not only uniform).
- Gated MLPs (gate/up/down: Llama, Mistral, Qwen2, Gemma) and ReLU MLPs with biases (OPT's fc1/fc2), each with
  the reference's own rounds and weights (alpha = beta = gamma = 5 and 0.1 unless given). For OPT: fc1 refit by
  least squares on ``z - b1``, fc2 by 10 gradient steps on the mean squared error (:func:`fc2_gradient_steps`),
  ``p`` as above with ``relu(z)``, ``z`` by the two-candidate closed form (:func:`update_z_relu`). Other
  activations without a gate (GPT-2's GELU) are refused before any weight changes.
- Whole-unit (composite) pruning is refused: the joint solve re-chooses every mask.

Memory per block: ``X``, ``Y`` (``d x N``) and ``z``, ``s``, ``p`` (``d_ff x N``), i.e. ``(2 d + 3 d_ff) N`` fp32
values, plus the ``d_ff x d_ff`` Gram of ``p`` and its solve. For SmolLM2 (d=576, d_ff=1536) and 128 x 512 tokens:
about 1.5 GB. Under DDP/ZeRO every rank keeps its own tokens; the Gram matrices are summed over ranks, so all
ranks derive the same weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..calibration.block import BlockContext, ProjectionStatistics
from ..calibration.stats import sum_over_ranks
from ..core.patterns import Pattern
from ..core.validation import check_int, check_positive
from .base import PruneResult, PruningMethod
from .sparsegpt import SparseGPT

GATED = ("gate", "up", "down")
RELU = ("up", "down")  # OPT: fc1, fc2


class SparseLLM(PruningMethod):
    """SparseLLM; see the module docstring.

    Args:
        iterations: alternating rounds per block (reference: 4).
        alpha: weight of ``||s - W_gate X||^2`` (gated) or ``||z - W_fc1 X - b||^2`` (ReLU); None = the
            reference's value for the MLP: 5 for gated (Llama family), 0.1 for ReLU (OPT). Same for beta, gamma.
        beta: weight of ``||Y - W_down p||^2``.
        gamma: weight of ``||p - act(s) * z||^2`` (gated) or ``||p - relu(z)||^2`` (ReLU).
        s_steps: gradient passes of the gate-output update (reference: 2).
        s_lr: learning rate of the gate-output update (reference: 0.01).
        chunk_tokens: tokens per chunk of the gate-output update (reference: 1000).
        fc2_steps: gradient steps of the ReLU MLP's output-projection refit (reference: 10, learning rate 0.01).
        blocksize: SparseGPT's column block for every pruning step (reference: 128).
        damp: SparseGPT's relative Hessian damping (reference: 0.01).
    """

    name = "sparsellm"

    def __init__(
        self,
        iterations: int = 4,
        alpha: float | None = None,
        beta: float | None = None,
        gamma: float | None = None,
        s_steps: int = 2,
        s_lr: float = 0.01,
        chunk_tokens: int = 1000,
        fc2_steps: int = 10,
        blocksize: int = 128,
        damp: float = 0.01,
    ) -> None:
        check_int("sparsellm iterations", iterations, 1)
        check_int("sparsellm s_steps", s_steps, 0)
        check_int("sparsellm chunk_tokens", chunk_tokens, 1)
        check_int("sparsellm fc2_steps", fc2_steps, 0)
        for field, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if value is not None:
                check_positive(f"sparsellm {field}", value)
        check_positive("sparsellm s_lr", s_lr)
        self.iterations, self.s_steps, self.chunk_tokens, self.fc2_steps = iterations, s_steps, chunk_tokens, fc2_steps
        self.alpha, self.beta, self.gamma, self.s_lr = alpha, beta, gamma, float(s_lr)
        self._sparsegpt = SparseGPT(blocksize=blocksize, damp=damp)

    def scores(self, weight: torch.Tensor, stats: ProjectionStatistics) -> torch.Tensor:
        return self._sparsegpt.scores(weight, stats)

    def prune(self, weight: torch.Tensor, stats, pattern: Pattern, num_prune: int) -> PruneResult:
        return self._sparsegpt.prune(weight, stats, pattern, num_prune)

    def weights_for(self, gated: bool) -> tuple[float, float, float]:
        """``(alpha, beta, gamma)``: the given values, else the reference's for this kind of MLP."""
        default = 5.0 if gated else 0.1
        return tuple(default if v is None else float(v) for v in (self.alpha, self.beta, self.gamma))

    def prune_block(self, block: BlockContext) -> dict[str, PruneResult]:
        gated = "gate" in block.adapter.spec.projections
        names = GATED if gated else RELU
        mlp = {p.name: p for p in block.projections if p.name in names}
        act = _check_block(block, mlp, names)
        results = {p.key: block.prune_projection(p, self.prune) for p in block.projections if p.name not in mlp}
        hessians = {name: block.stats(mlp[name]).hessian for name in names}
        seen = {
            name: [_tokens(t) for t in pair] for name, pair in block.capture({n: mlp[n].module for n in names}).items()
        }
        weights, biases = {}, {}
        for name in names:
            with block.gathered(mlp[name]):
                weights[name] = mlp[name].weight_view().detach().float().clone()
                bias = mlp[name].module.bias
                biases[name] = None if bias is None else bias.detach().float().clone()
        solve = self._solve_gated if gated else self._solve_relu
        pruned = solve(block, mlp, weights, biases, hessians, seen, act)
        for name in names:
            weight = pruned[name].weight.to(mlp[name].weight.dtype)
            results[mlp[name].key] = PruneResult(keep=pruned[name].keep, weight=weight)
        return results

    def _prune_mlp(self, block, mlp, weights, hessians, names) -> dict[str, PruneResult]:
        """SparseGPT on every MLP projection at its planned count; ``weights`` become the pruned ones."""
        pruned = {}
        for name in names:
            result = self._sparsegpt.prune(
                weights[name], _Hessian(hessians[name]), block.pattern, block.num_prune[mlp[name].key]
            )
            pruned[name], weights[name] = result, result.weight.float()
        return pruned

    def _solve_gated(self, block, mlp, weights, biases, hessians, seen, act) -> dict[str, PruneResult]:
        """The Llama-family rounds (steps 3a-3e of the module docstring)."""
        alpha, beta, gamma = self.weights_for(gated=True)
        x, z, s = seen["up"][0], seen["up"][1], seen["gate"][1]
        p, y = seen["down"]
        x_pinv_gram = torch.linalg.pinv(_gram(x, x), hermitian=True) if self.iterations > 1 else None  # X is fixed
        for t in range(self.iterations):
            if t > 0:
                weights["up"] = _gram(z, x) @ x_pinv_gram
                weights["gate"] = _gram(s, x) @ x_pinv_gram
                gram_p = _gram(p, p)
                weights["down"] = _gram(y, p) @ torch.linalg.pinv(gram_p, hermitian=True)
                hessians["down"] = gram_p / sum_over_ranks(p.shape[0])
            pruned = self._prune_mlp(block, mlp, weights, hessians, GATED)
            if t == self.iterations - 1:
                return pruned
            a = act(s)
            p = update_p(weights["down"], y, a * z, beta, gamma)
            z = update_z(x @ weights["up"].t(), a, p)
            s = self._update_s(s, x, z, p, weights["gate"], act, alpha, gamma)
        raise AssertionError("unreachable: iterations >= 1")

    def _solve_relu(self, block, mlp, weights, biases, hessians, seen, act) -> dict[str, PruneResult]:
        """The OPT rounds of the reference: ``z`` is the fc1 output before the ReLU, ``p = relu(z)`` fc2's input;
        fc1 refit by least squares on ``z - b1``, fc2 by ``fc2_steps`` gradient steps, ``z`` by
        :func:`update_z_relu`."""
        alpha, beta, gamma = self.weights_for(gated=False)
        x, z = seen["up"]
        p, y = seen["down"]
        b1, b2 = _bias_or_zero(biases["up"], z), _bias_or_zero(biases["down"], y)
        x_pinv_gram = torch.linalg.pinv(_gram(x, x), hermitian=True) if self.iterations > 1 else None  # X is fixed
        for t in range(self.iterations):
            if t > 0:
                weights["up"] = _gram(z - b1, x) @ x_pinv_gram
                weights["down"] = fc2_gradient_steps(weights["down"], b2, p, y, self.fc2_steps)
                hessians["down"] = _gram(p, p) / sum_over_ranks(p.shape[0])
            pruned = self._prune_mlp(block, mlp, weights, hessians, RELU)
            if t == self.iterations - 1:
                return pruned
            p = update_p(weights["down"], y - b2, torch.relu(z), beta, gamma)
            z = update_z_relu(x @ weights["up"].t() + b1, p, alpha, gamma)
        raise AssertionError("unreachable: iterations >= 1")

    def _update_s(self, s, x, z, p, w_gate, act, alpha: float, gamma: float) -> torch.Tensor:
        """Gradient steps on ``alpha ||s - X W_gate^T||^2 + gamma ||p - act(s) * z||^2``, chunk by chunk, with the
        safeguards of :func:`update_s_step`."""
        s = s.clone()
        for _ in range(self.s_steps):
            for start in range(0, s.shape[0], self.chunk_tokens):
                part = slice(start, start + self.chunk_tokens)
                s[part] = update_s_step(s[part], x[part] @ w_gate.t(), z[part], p[part], act, alpha, gamma, self.s_lr)
        return s


def s_objective(s, gate_x, z, p, act, alpha: float, gamma: float) -> torch.Tensor:
    """The gate-output objective of every element: ``alpha (s - W_gate x)^2 + gamma (p - act(s) z)^2``."""
    return alpha * (s - gate_x).square() + gamma * (p - act(s) * z).square()


def update_s_step(s, gate_x, z, p, act, alpha: float, gamma: float, lr: float) -> torch.Tensor:
    """One safeguarded gradient step on :func:`s_objective`, which is separable over the elements of ``s``.

    The reference takes ``s - lr * grad`` with a fixed ``lr``. Its curvature in an element is about
    ``2 alpha + 2 gamma (act'(s) z)^2``, so where the up output ``z`` is large the fixed step overshoots and the
    iteration diverges (``lr x curvature`` far above 2 in the layers with the largest ``|z|``: the objective grows
    instead of falling; see bench/RESULTS.md, section 'SparseLLM against SparseGPT and Wanda').
    Here each element's step is ``lr`` capped at the inverse of that Gauss-Newton curvature (the reference's step
    wherever that one is stable), and an element keeps its step only where it lowers that element's objective.
    """
    with torch.enable_grad():
        leaf = s.detach().requires_grad_(True)
        activated = act(leaf)
        loss = alpha * (leaf - gate_x).square() + gamma * (p - activated * z).square()
        (grad,) = torch.autograd.grad(loss.sum(), leaf, retain_graph=True)
        (slope,) = torch.autograd.grad(activated.sum(), leaf)  # act'(s): act is element-wise
    curvature = 2 * alpha + 2 * gamma * (slope * z).square()
    stepped = s - grad * torch.clamp(1 / curvature, max=lr)
    lower = s_objective(stepped, gate_x, z, p, act, alpha, gamma) < loss.detach()
    return torch.where(lower, stepped, s)


def update_p(w_down: torch.Tensor, y: torch.Tensor, target: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """``argmin_p beta ||Y - p W_down^T||^2 + gamma ||p - target||^2`` in closed form; token-major ``[N, .]``."""
    system = beta * w_down.t() @ w_down + gamma * torch.eye(w_down.shape[1], dtype=w_down.dtype, device=w_down.device)
    return torch.linalg.solve(system, (beta * y @ w_down + gamma * target).t()).t()


def update_z(up_x: torch.Tensor, act_s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``argmin_z ||z - X W_up^T||^2 + ||p - act(s) * z||^2``, element-wise closed form."""
    return (up_x + act_s * p) / (act_s.square() + 1)


def update_z_relu(fc1_x: torch.Tensor, p: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """``argmin_z alpha ||z - (X W_fc1^T + b)||^2 + gamma ||p - relu(z)||^2``, element-wise, as the reference: the
    minimiser on ``z >= 0`` (``(gamma p + alpha m) / (gamma + alpha)`` clipped at 0) or on ``z <= 0`` (``m`` clipped
    at 0), whichever has the lower objective (ties: the first)."""
    m = fc1_x
    nonnegative = ((gamma * p + alpha * m) / (gamma + alpha)).clamp(min=0)
    nonpositive = m.clamp(max=0)

    def objective(z: torch.Tensor) -> torch.Tensor:
        return gamma * (p - torch.relu(z)).square() + alpha * (z - m).square()

    return torch.where(objective(nonnegative) <= objective(nonpositive), nonnegative, nonpositive)


def fc2_gradient_steps(
    w: torch.Tensor, bias: torch.Tensor, p: torch.Tensor, y: torch.Tensor, steps: int
) -> torch.Tensor:
    """The reference's fc2 refit: ``steps`` gradient steps (learning rate 0.01) on the mean squared error
    ``mean((p W^T + b - Y)^2)`` over all tokens (of all ranks) and outputs, from the current (pruned) weights.
    The gradient comes from the Gram matrices, so the tokens are read once. With the mean over every element the
    steps are small: this mostly keeps fc2 where pruning left it, as in the reference."""
    count = sum_over_ranks(p.shape[0]) * y.shape[1]
    gram_pp, gram_yp = _gram(p, p), _gram(y, p)
    sum_p = _gram(torch.ones_like(p[:, :1]), p)  # [1, d_ff]
    for _ in range(steps):
        grad = (w @ gram_pp + bias.reshape(-1, 1) @ sum_p - gram_yp) * (2 / count)
        w = w - 0.01 * grad
    return w


def mlp_activation(block: nn.Module, projection_path: str):
    """The MLP's own activation: ``act_fn`` (Llama family), ``activation_fn`` (OPT) or ``act`` (GPT-2) of the
    module holding the projection."""
    parent_path = projection_path.rpartition(".")[0]
    module = block.get_submodule(parent_path) if parent_path else block
    for attribute in ("act_fn", "activation_fn", "act"):
        if getattr(module, attribute, None) is not None:
            return getattr(module, attribute)
    raise ValueError(
        f"SparseLLM reads the MLP activation from {type(module).__name__}.act_fn, .activation_fn or .act, which "
        "this architecture lacks"
    )


class _Hessian:
    """Statistics holding only a Hessian (what SparseGPT reads), for the down projection's ``p p^T / N``."""

    def __init__(self, hessian: torch.Tensor) -> None:
        self.hessian = hessian


def _check_block(block: BlockContext, mlp: dict, names: tuple[str, ...]):
    """Refuse what the joint solve cannot do (before any weight of any block changes: the engine commits only
    after every block); return the MLP's activation."""
    missing = [n for n in names if n not in mlp]
    if missing:
        raise ValueError(
            f"SparseLLM solves the MLP's {', '.join(names)} jointly, but {missing} of layer {block.layer} are not "
            "targeted"
        )
    if block.structural:
        raise ValueError("SparseLLM re-chooses every MLP mask: composite pruning (structured_fraction > 0) is refused")
    act = mlp_activation(block.block, block.adapter.spec.projections[names[0]])
    if names == RELU and not isinstance(act, nn.ReLU):
        raise ValueError(
            f"SparseLLM supports gated MLPs (Llama family) and ReLU MLPs (OPT); this MLP's activation is "
            f"{type(act).__name__}, for which the reference has no closed-form z update (e.g. GPT-2)"
        )
    return act


def _bias_or_zero(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape[1], dtype=like.dtype, device=like.device) if bias is None else bias


def _tokens(batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.reshape(-1, b.shape[-1]).float() for b in batches])


def _gram(a: torch.Tensor, b: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``a^T b`` over all tokens (summed over ranks), in token chunks."""
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
    for start in range(0, a.shape[0], chunk):
        out += a[start : start + chunk].t() @ b[start : start + chunk]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out)
    return out
