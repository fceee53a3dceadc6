"""MSP: mixed sparsity per layer from Fisher sensitivity and an evolutionary search (plug-and-play: any method).

No public code exists; the seeds give the idea (layer sensitivity = trace of the Fisher information, then an
evolutionary search over per-layer sparsities). Every choice below is ours where the paper is silent:

- **Sensitivity** ``F_l`` = sum over the calibration batches of the squared gradients of the causal-LM loss with
  respect to layer ``l``'s targeted weights (the trace of the empirical Fisher), from backward passes of the
  whole model on up to ``fisher_batches`` batches (one squared gradient per batch, or per ``fisher_sequences``
  sequences of it, which bounds the backward's memory); summed over ranks under DDP and ZeRO. Each weight gradient is
  formed from the projection's input and output gradient (hooks), never in ``.grad``: a run in the middle of
  training is not disturbed, frozen weights work, and under ZeRO-3 no rank needs a whole weight.
- **Search space**: one sparsity per layer (all its targeted projections share it), within ``[min_sparsity,
  max_sparsity]``, with the parameter-weighted mean exactly the target for every individual. With the
  ``mixed:M`` pattern every layer's sparsity is a whole number of ``1/M`` steps (its projections keep ``N`` of
  every ``M``, N per layer), which needs layers of equal size and ``sparsity x M x layers`` a whole number (a
  75% mean at M = 8 over 30 layers: N values summing to 60); individuals are rounded onto that grid with the sum
  kept (largest remainders), and a mutation moves exactly one step. A fixed ``N:M`` pattern is refused (nothing
  to search).
- **First population**: uniform, plus Fisher-seeded individuals ``s_l = s - k * z_l`` (``z_l`` = centred, unit-
  range ``log F_l``: more sensitive layers less sparse) for spreads ``k`` evenly spaced up to ``max_spread``, each
  projected back onto the exact mean.
- **Next generations**: the best half survives (elitism); children are the mean of two random survivors (the mean
  of two feasible individuals is feasible) plus ``mutations`` moves, each shifting up to ``mutation_step`` of
  sparsity from one random layer to another in equal parameter counts (the weighted mean is unchanged).
- **Fitness**: perplexity on the first ``fitness_batches`` calibration batches (held-in text, never the test set)
  after pruning every projection with the chosen method's *scores* under the pattern at the candidate's exact
  counts, from dense statistics measured once (one layer-streamed pass: the column norms). What is reused: the
  dense statistics for every candidate; what is approximated: reconstruction methods (SparseGPT, SparseLLM) are
  scored mask-only (their ``scores``, no weight update) during the search, and prune fully once the best
  individual is chosen. Each candidate's masks are applied in place one module at a time and the weights restored
  exactly (under ZeRO-3 one module gathered at a time, and each rank keeps only its own partitions' originals);
  the model is unchanged after.
- Population, generations, mutation and the seed are arguments; the search is reproducible for a fixed seed
  (one ``torch.Generator``). A progress bar runs per generation; the report gets the sensitivities, the best
  individual, the fitness history and every individual of every generation.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..calibration.block import edited_weights
from ..core.patterns import MixedNM
from ..core.validation import check_int, check_open_unit
from .base import Allocation, AllocationContext, Budget, count_quanta, exact_counts


class MSP(Allocation):
    """MSP; see the module docstring.

    Args:
        population: individuals per generation (>= 2).
        generations: generations after the first (0 = pick the best of the first population).
        mutations: moves applied to each child.
        mutation_step: largest sparsity moved by one move.
        max_spread: largest Fisher-seeded spread ``k`` of the first population.
        fitness_batches: calibration batches the fitness perplexity is measured on.
        fisher_batches: calibration batches of the Fisher pass.
        fisher_sequences: sequences per backward pass of the Fisher estimate. None: a whole calibration batch
            (the squared gradient of each batch's loss, as the sensitivity is defined above); ``k``: each batch
            split into passes of ``k`` sequences, each squared on its own (1: the per-sequence empirical
            Fisher). The backward holds every layer's activations and the full-vocabulary logits of one pass, so
            its memory falls with ``k`` (see bench/RESULTS.md, section 'MSP's search: time and memory').
        seed: seed of the search.
    """

    needs_whole_model = True  # gradients through the whole model, and full-model fitness forwards

    name = "msp"

    def __init__(
        self,
        population: int = 8,
        generations: int = 5,
        mutations: int = 4,
        mutation_step: float = 0.05,
        max_spread: float = 0.2,
        fitness_batches: int = 4,
        fisher_batches: int = 8,
        fisher_sequences: int | None = None,
        seed: int = 0,
    ) -> None:
        for field, value, low in (("population", population, 2), ("generations", generations, 0),
                                  ("mutations", mutations, 0), ("fitness_batches", fitness_batches, 1),
                                  ("fisher_batches", fisher_batches, 1), ("seed", seed, 0)):  # fmt: skip
            check_int(f"msp {field}", value, low)
        if fisher_sequences is not None:
            check_int("msp fisher_sequences", fisher_sequences, 1)
        check_open_unit("msp mutation_step", mutation_step)
        check_open_unit("msp max_spread", max_spread)
        self.population, self.generations, self.mutations = population, generations, mutations
        self.mutation_step, self.max_spread = float(mutation_step), float(max_spread)
        self.fitness_batches, self.fisher_batches, self.seed = fitness_batches, fisher_batches, seed
        self.fisher_sequences = fisher_sequences

    def allocate(self, context: AllocationContext, target: float) -> Budget:
        config = context.config
        if config is None:
            raise ValueError("MSP needs the pruning config (method and pattern) in its AllocationContext")
        if config.parsed_pattern.fixed_sparsity is not None:
            raise ValueError(
                f"allocation msp searches per-layer sparsities; pattern={config.pattern!r} fixes them: use an "
                "unstructured pattern, or 'mixed:M' for N:M with N chosen per layer"
            )
        layers = sorted({p.layer for p in context.projections})
        sizes = [sum(p.numel for p in context.projections if p.layer == layer) for layer in layers]
        _check_mixed_grid(config.parsed_pattern, sizes, target)
        fisher = fisher_trace(context, layers, self.fisher_batches, self.fisher_sequences)
        search = _Search(self, context, layers, sizes, target)
        best, details = search.run(fisher)
        sparsity = {p.key: best[layers.index(p.layer)] for p in context.projections}
        details["fisher_trace"] = fisher
        return Budget(sparsity, {p.key: fisher[layers.index(p.layer)] for p in context.projections}, details)


def fisher_trace(
    context: AllocationContext, layers: list[int], max_batches: int, sequences: int | None = None
) -> list[float]:
    """Per layer: the summed squared gradients of the LM loss w.r.t. its targeted weights (``[out, in]`` views),
    one squared gradient per batch of the first ``max_batches`` (or per ``sequences`` sequences of each).

    Each projection's weight gradient is formed from its recorded input and the gradient of its output (``g^T x``
    summed over tokens, as autograd would form it), and the backward pass runs to the embedding output only: no
    parameter's ``.grad`` is read or written, so a run in the middle of training is not disturbed, and under
    DeepSpeed ZeRO-3, where each rank holds a slice of every weight, nothing whole is needed but activations.
    """
    model = context.model
    by_module: dict[int, list] = {}
    for proj in context.projections:
        by_module.setdefault(id(proj.module), []).append(proj)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    embedded: list[torch.Tensor] = []

    def keep_embedding(_module, _args, output: torch.Tensor) -> torch.Tensor:
        output = output if output.requires_grad else output.detach().requires_grad_(True)
        embedded.append(output)
        return output

    def record(module, args, output: torch.Tensor) -> None:
        key = id(module)
        inputs[key] = args[0].detach()
        output.register_hook(lambda grad: add_squared_gradient(key, grad))

    def add_squared_gradient(key: int, grad_output: torch.Tensor) -> None:
        x = inputs.pop(key)
        gradient = grad_output.reshape(-1, grad_output.shape[-1]).double().t() @ x.reshape(-1, x.shape[-1]).double()
        for proj in by_module[key]:  # ``gradient`` is [out, in]; the parameter's own layout may be its transpose
            view = proj.view_of(gradient.t() if proj.transposed else gradient)
            totals[layers.index(proj.layer)] += float(view.square().sum())

    modules = {id(p.module): p.module for p in context.projections}
    handles = [context.model.get_input_embeddings().register_forward_hook(keep_embedding)]
    handles += [module.register_forward_hook(record) for module in modules.values()]
    try:
        passes = [part for ids in context.batches[:max_batches] for part in ids.split(sequences or len(ids))]
        for input_ids in passes:
            ids = input_ids.to(model.get_input_embeddings().weight.device)
            embedded.clear()
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                torch.autograd.grad(loss, embedded)
            inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def _check_mixed_grid(pattern, sizes: list[int], target: float) -> None:
    """Mixed N:M: equal layers whose per-layer steps of 1/M can average exactly to the target."""
    if not isinstance(pattern, MixedNM):
        return
    if len(set(sizes)) > 1:
        raise ValueError(
            f"allocation msp with pattern={pattern.name!r} needs layers of equal size (targeted weights per layer: "
            f"{sorted(set(sizes))}); check targets/exclude, or use an unstructured pattern"
        )
    steps = target * pattern.m * len(sizes)
    if abs(steps - round(steps)) > 1e-6:
        raise ValueError(
            f"allocation msp with pattern={pattern.name!r}: sparsity={target} x M={pattern.m} x {len(sizes)} "
            f"layers = {steps:g} is not a whole number of 1/M steps; choose a sparsity that makes it one"
        )


class _Search:
    """The evolutionary search over per-layer sparsity vectors (see the module docstring)."""

    def __init__(self, msp: MSP, context: AllocationContext, layers: list[int], sizes: list[int], target: float):
        self.msp, self.context, self.layers, self.target = msp, context, layers, target
        self.sizes = torch.tensor(sizes, dtype=torch.float64)
        config = context.config
        self.low, self.high = config.min_sparsity, config.max_sparsity
        pattern = config.parsed_pattern
        self.m = pattern.m if isinstance(pattern, MixedNM) else None  # mixed N:M: sparsities in steps of 1/m
        if self.m is not None:
            self.low = max(math.ceil(self.low * self.m - 1e-9), 1) / self.m
            self.high = min(math.floor(self.high * self.m + 1e-9), self.m - 1) / self.m
        self.generator = torch.Generator().manual_seed(msp.seed)
        self.norms = _dense_column_norms(context)
        self.fitness_batches = context.batches[: msp.fitness_batches]

    def run(self, fisher: list[float]) -> tuple[list[float], dict]:
        population = self._first_population(torch.tensor(fisher, dtype=torch.float64))
        history, everyone = [], []
        bar = tqdm(range(self.msp.generations + 1), desc="msp search", disable=not self.context.progress)
        for generation in bar:
            if generation > 0:
                population = self._next_generation(population)
            fitness = [self._fitness(individual) for individual in population]
            order = sorted(range(len(population)), key=fitness.__getitem__)
            population, fitness = [population[i] for i in order], [fitness[i] for i in order]
            history.append({"generation": generation, "best": fitness[0], "mean": sum(fitness) / len(fitness)})
            everyone.append([individual.tolist() for individual in population])
            bar.set_postfix(best=f"{fitness[0]:.3f}")
        best = population[0].tolist()
        return best, {"best": best, "best_fitness": fitness[0], "history": history, "population": everyone}

    # -- individuals ---------------------------------------------------------------------------------------
    def _feasible(self, values: torch.Tensor) -> torch.Tensor:
        """Clip to the bounds and shift so the parameter-weighted mean is exactly the target."""
        lo, hi = -1.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            mean = float((values + mid).clamp(self.low, self.high) @ self.sizes / self.sizes.sum())
            lo, hi = (mid, hi) if mean < self.target else (lo, mid)
        shifted = (values + (lo + hi) / 2).clamp(self.low, self.high)
        # The bisection leaves ~1e-16 of error; spread it over the layers strictly inside the bounds.
        free = (shifted > self.low) & (shifted < self.high)
        error = self.target * self.sizes.sum() - shifted @ self.sizes
        if free.any():
            shifted[free] += error / self.sizes[free].sum()
        return shifted if self.m is None else self._on_grid(shifted)

    def _on_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Mixed N:M: whole steps of 1/m, the (equal-size) layers' sum of steps kept exactly (largest remainders)."""
        steps = values * self.m
        whole = steps.floor().clamp(self.low * self.m, self.high * self.m)
        missing = round(self.target * self.m * len(self.layers)) - int(whole.sum())
        for i in torch.argsort(steps - whole, descending=True, stable=True).tolist():
            if missing == 0:
                break
            if whole[i] + 1 <= round(self.high * self.m):
                whole[i] += 1
                missing -= 1
        return whole / self.m

    def _first_population(self, fisher: torch.Tensor) -> list[torch.Tensor]:
        uniform = torch.full((len(self.layers),), self.target, dtype=torch.float64)
        log = fisher.clamp_min(1e-30).log()
        spread = log.max() - log.min()
        z = (log - log.mean()) / spread if spread > 0 else torch.zeros_like(log)
        count = self.msp.population - 1
        seeded = [self._feasible(uniform - self.msp.max_spread * (i + 1) / count * z) for i in range(count)]
        return [uniform, *seeded]

    def _next_generation(self, ranked: list[torch.Tensor]) -> list[torch.Tensor]:
        survivors = ranked[: max(2, len(ranked) // 2)]
        children = []
        while len(survivors) + len(children) < self.msp.population:
            a, b = torch.randint(len(survivors), (2,), generator=self.generator).tolist()
            child = (survivors[a] + survivors[b]) / 2
            children.append(self._mutate(child))
        return survivors + children

    def _mutate(self, child: torch.Tensor) -> torch.Tensor:
        child = child.clone()
        for _ in range(self.msp.mutations):
            i, j = torch.randperm(len(self.layers), generator=self.generator)[:2].tolist()
            step = float(torch.rand((), generator=self.generator)) * self.msp.mutation_step
            if self.m is not None:  # mixed N:M: one whole step of 1/m (none where a bound leaves no room)
                step = 1 / self.m
            # Move ``moved`` weights' worth of sparsity from layer j to layer i, within both layers' bounds.
            moved = step * min(self.sizes[i], self.sizes[j])
            room = float((self.high - child[i]) * self.sizes[i]), float((child[j] - self.low) * self.sizes[j])
            moved = min(moved, *room)
            child[i] += moved / self.sizes[i]
            child[j] -= moved / self.sizes[j]
        return self._feasible(child)

    # -- fitness -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _fitness(self, individual: torch.Tensor) -> float:
        """Held-in perplexity with every projection pruned by the method's scores at this individual's counts."""
        config, projections = self.context.config, self.context.projections
        sizes = {p.key: p.numel for p in projections}
        wanted = {p.key: float(individual[self.layers.index(p.layer)]) for p in projections}
        pattern = config.parsed_pattern
        quanta = count_quanta(pattern, projections)
        counts = exact_counts(sizes, wanted, self.target, self.low, self.high, quanta=quanta)

        def prune(proj, view: torch.Tensor) -> None:
            scores = config.method.scores(view, _ColumnNorms(self.norms[proj.key]))
            view.masked_fill_(~pattern.keep_mask(scores, counts[proj.key]), 0)

        from ..evaluation.perplexity import perplexity  # here: torchmetrics loads only when a search runs

        with edited_weights(projections, prune):
            value = perplexity(self.context.model, self.fitness_batches, progress=False)
        return _mean_over_ranks(value)


class _ColumnNorms:
    """Dense statistics cached for the search: column norms only (what mask-only scoring reads)."""

    def __init__(self, column_norms: torch.Tensor) -> None:
        self.column_norms = column_norms

    @property
    def hessian(self) -> torch.Tensor:
        raise ValueError(
            "allocation msp scores candidates from cached column norms; this method's scores read a Hessian, "
            "which the search does not cache"
        )


def _dense_column_norms(context: AllocationContext) -> dict[str, torch.Tensor]:
    norms: dict[str, torch.Tensor] = {}
    for block in context.dense_blocks("msp dense statistics"):
        for proj in block.projections:
            norms[proj.key] = block.stats(proj).column_norms
    return norms


def _mean_over_ranks(ppl: float) -> float:
    """Perplexity over every rank's fitness batches (equal token counts per rank: the geometric mean)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ppl
    log = torch.tensor([math.log(ppl)], dtype=torch.float64)
    dist.all_reduce(log)
    return math.exp(float(log) / dist.get_world_size())
