"""True-sequential calibration of one decoder block: every projection calibrated on its inputs *with the
projections before it already pruned*, in about one pass over the block (SparseGPT's ``--true-sequential``).

The default order (``true_sequential=False``, as Wanda's and SparseGPT's reference code by default) takes every
projection's statistics from one pass over the block as it entered, then runs the pruned block again for the
next block's inputs: two passes per block. Here the block is run in *stages*: a stage is the next projections
fed one tensor (q/k/v, then o, then gate/up, then down in a Llama block) and a pass over the calibration batches
collects just their statistics and stops. The method prunes them; the next pass runs them with their pruned
weights. Nothing is computed twice that costs a matmul:

- a projection not yet pruned is stood in for by a probe that records its input and returns zeros (its real
  output is not needed: the pass stops at the first projection fed something else);
- a pruned projection computes once, in the first pass after it was pruned, and its output per batch is cached
  and replayed after (the first batch's only, where the next pass needs no more: below);
- a submodule of the block whose projections are all pruned (the attention, an MLP) is cached and replayed as a
  whole once it has run;
- a stage of one projection (o, down) keeps its recorded inputs for the next pass; if that projection's output
  is its submodule's output (checked on the first batch: the same tensor object, nothing else but ``None``
  returned beside it), the submodule is shortcut to that projection on its kept input for the other batches, so
  the attention itself (scores, softmax), which fed o in o's own pass, is not run again. So in the pass of such
  a stage, the pruned projections inside the submodule it completes (q/k/v in o's pass, gate/up in down's) are
  cached for the first batch only: the next pass needs them for that batch alone. Where the submodule turns out
  not to return its projection's output (eager attention returns its weights beside it), the next pass runs them
  pruned again on the other batches: the same results, their matmuls once more.

So the block costs about one forward pass (the attention once more for the first batch); the last pass gives the
block's output (the next block's input) with every projection pruned, equal to running the pruned block.
Memory: the cached outputs and kept inputs, at most about ``(d + d_ff) x tokens`` values in the model's dtype
(Llama: the attention's output and down's inputs; gate/up's outputs would add ``2 d_ff x tokens`` if they were
cached for every batch), beside the block's input and output that sequential calibration holds anyway.

Stages are found from the forward itself (which projections receive the very same tensor object), so nothing is
written per architecture; a fused projection module (GPT-2's ``c_attn``) is one stage member. Cached tensors are
stored and replayed as copies, so a block that adds into a submodule's output in place cannot change them. Under
DeepSpeed ZeRO-3 a pass cannot stop early (DeepSpeed's hooks would keep the gathered parameters in use), so each
pass runs to the block's end on zeros past its stage, and no submodule is shortcut: same results, more time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, suppress

import torch
from torch import nn

from ..core.zero import is_partitioned
from .capture import BlockInputs, StopForward, first_output, in_features, out_features, swapped_weights
from .stats import InputStatistics, check_finite


class TrueSequentialRun:
    """One block's staged calibration. ``modules``: the block's projection modules (name, module), in execution
    order. Ask :meth:`statistics` of a module once every module before it is pruned (:meth:`set_pruned`);
    :meth:`outputs` once all are."""

    def __init__(self, block: nn.Module, modules: Sequence[tuple[str, nn.Module]], inputs: BlockInputs) -> None:
        self.block, self.inputs = block, inputs
        self.names = {id(m): name for name, m in modules}
        self.modules = {id(m): m for _, m in modules}
        self.stats: dict[int, InputStatistics] = {}
        self.pruned: dict[int, dict[nn.Parameter, torch.Tensor]] = {}  # module -> its pruned parameter values
        self.cache: dict[int, list] = {}  # module or submodule -> its output per batch
        self.first_batch_only: set[int] = set()  # cached modules whose cache holds the first batch alone
        self.kept_inputs: dict[int, list[torch.Tensor]] = {}  # the last one-projection stage's inputs per batch
        self.can_stop = not any(is_partitioned(p) for p in block.parameters())
        self.batch = 0  # the batch being run, for the replays

    def statistics(self, module: nn.Module, hessian: bool) -> InputStatistics:
        """The input statistics of ``module`` with every module before it pruned (one pass for its stage)."""
        entry = self.stats.get(id(module))
        if entry is None or (hessian and entry.xxt is None):
            if id(module) in self.pruned:
                raise RuntimeError(f"true_sequential: {self.names[id(module)]} was pruned before its statistics")
            self._collect_stage(module, hessian)
        return self.stats[id(module)]

    def set_pruned(self, module: nn.Module, values: dict[nn.Parameter, torch.Tensor]) -> None:
        """``module`` is pruned: the next passes run it with these parameter values (``swapped_weights``)."""
        self.pruned[id(module)] = values

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The block's output per batch, every projection pruned (the last pass; the caches are freed after)."""
        missing = [self.names[key] for key in self.modules if key not in self.pruned]
        if missing:
            raise RuntimeError(f"true_sequential: the block's outputs were asked for before {missing} were pruned")
        try:
            with self._staged(caching=False):
                return [first_output(self._run(i)) for i in range(len(self.inputs.hidden))]
        finally:
            self.cache.clear()
            self.first_batch_only.clear()
            self.kept_inputs.clear()

    # -- one pass ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _collect_stage(self, target: nn.Module, hessian: bool) -> None:
        stage = _Stage(self, hessian)
        with self._staged(caching=True, probe=stage):
            for i in range(len(self.inputs.hidden)):
                stage.start_batch()
                with suppress(StopForward):
                    self._run(i)
        if id(target) not in stage.entries:
            first = self.names[stage.members[0]] if stage.members else "nothing"
            raise RuntimeError(
                f"true_sequential: the statistics of {self.names[id(target)]} were asked for while {first} "
                "(run before it, fed another tensor) is not pruned yet; prune projections in execution order"
            )
        check_finite(stage.entries.values())
        for key, entry in stage.entries.items():
            entry.all_reduce()  # under DDP every rank calibrates on its own share; all see the sum
            self.stats[key] = entry
        complete = len(stage.kept) == len(self.inputs.hidden)
        self.kept_inputs = {stage.members[0]: stage.kept} if len(stage.members) == 1 and complete else {}

    def _run(self, batch: int):
        self.batch = batch
        return self.block(self.inputs.hidden[batch], *self.inputs.args[batch], **self.inputs.kwargs[batch])

    @contextmanager
    def _staged(self, caching: bool, probe: _Stage | None = None):
        """For one pass: pruned modules (and whole pruned submodules) replay their cached outputs or run pruned
        and are cached; modules not pruned yet are probed. Restored after."""
        sealed = self._sealed_submodules()
        with ExitStack() as stack:
            computed = [key for key in self.pruned if key not in self.cache or key in self.first_batch_only]
            stack.enter_context(swapped_weights({p: v for key in computed for p, v in self.pruned[key].items()}))
            newly_cached = []
            for key, module in [*self.modules.items(), *sealed.items()]:
                if key in self.cache:
                    stack.enter_context(_forward_replaced(module, self._replay(key, module.forward)))
                elif key in self.pruned or key in sealed:
                    outermost = not _inside_any(module, sealed, key)
                    if caching and outermost:
                        self.cache[key] = []
                        newly_cached.append(key)
                        stack.callback(module.register_forward_hook(self._recorder(key, probe)).remove)
                    if key in sealed and outermost:
                        self._shortcut(module, stack)
                elif probe is not None:
                    stack.enter_context(_forward_replaced(module, probe.forward_of(module)))
            yield
        for key in newly_cached:
            expected = 1 if key in self.first_batch_only else len(self.inputs.hidden)
            if len(self.cache[key]) != expected:  # ran after the stage (pruned out of order)
                self._uncache(key)
            elif key in sealed:  # the submodule replays as a whole now: its modules' outputs are not needed
                for inner in sealed[key].modules():
                    if id(inner) != key:
                        self._uncache(id(inner))

    def _uncache(self, key: int) -> None:
        self.cache.pop(key, None)
        self.first_batch_only.discard(key)

    def _sealed_submodules(self) -> dict[int, nn.Module]:
        """Submodules of the block (not the block, not a projection) holding projections, all of them pruned."""
        sealed = {}
        for module in self.block.modules():
            if module is self.block or id(module) in self.modules:
                continue
            inner = [id(m) for m in module.modules() if id(m) in self.modules]
            if inner and all(key in self.pruned for key in inner):
                sealed[id(module)] = module
        return sealed

    def _shortcut(self, submodule: nn.Module, stack: ExitStack) -> None:
        """If a projection of ``submodule`` has kept inputs (never under ZeRO-3: the probes keep none there), the
        submodule may run as that projection on them."""
        inner = [m for m in submodule.modules() if id(m) in self.kept_inputs]
        if inner:
            shortcut = _Shortcut(self, submodule.forward, inner[0], self.kept_inputs[id(inner[0])])
            stack.callback(inner[0].register_forward_hook(shortcut.record).remove)
            stack.enter_context(_forward_replaced(submodule, shortcut.forward))

    def _replay(self, key: int, run: Callable) -> Callable:
        """The cached output of the batch being run; ``run`` (the module, pruned) for a batch not cached."""

        def forward(*args, **kwargs):
            cached = self.cache[key]
            return _copied(cached[self.batch]) if self.batch < len(cached) else run(*args, **kwargs)

        return forward

    def _recorder(self, key: int, probe: _Stage | None) -> Callable:
        def hook(_module, _args, output):
            if probe is not None and probe.diverged:  # past the stage the inputs are zeros (ZeRO-3 runs on)
                return
            if self.batch > 0 and self._first_batch_suffices(key, probe):
                self.first_batch_only.add(key)
            else:
                self.cache[key].append(_copied(output))

        return hook

    def _first_batch_suffices(self, key: int, probe: _Stage | None) -> bool:
        """Whether the next pass needs ``key``'s output of the first batch only: this pass's stage is one
        projection, whose inputs are kept, and pruning it seals a submodule holding ``key``, which the next pass
        shortcuts to that projection from the second batch on (see :class:`_Shortcut`)."""
        if probe is None or not self.can_stop or len(probe.members) != 1:
            return False
        member = self.modules[probe.members[0]]
        pruned = {*self.pruned, id(member)}
        for submodule in self.block.modules():
            inner = {id(m) for m in submodule.modules()}
            if submodule is self.block or id(member) not in inner or id(submodule) == key or key not in inner:
                continue
            if all(k in pruned for k in inner if k in self.modules):
                return True
        return False


class _Shortcut:
    """A sealed submodule's forward for one pass: the full forward on the first batch, which shows whether the
    submodule returns its projection's output (the same tensor object, beside nothing but ``None``); if so, for
    every later batch, the projection on its kept input, in the same structure."""

    def __init__(self, run: TrueSequentialRun, full_forward: Callable, projection: nn.Module, kept: list) -> None:
        self.run, self.full_forward, self.projection, self.kept = run, full_forward, projection, kept
        self.seen: list = []  # the projection's outputs in the first batch
        self.rest: tuple | None = None  # what the submodule returns beside that output, once shown to be Nones
        self.as_tuple = False

    def record(self, _module, _args, output) -> None:
        if self.run.batch == 0:
            self.seen.append(output)

    def forward(self, *args, **kwargs):
        if self.run.batch > 0 and self.rest is not None:
            out = self.projection(self.kept[self.run.batch])
            return (out, *self.rest) if self.as_tuple else out
        out = self.full_forward(*args, **kwargs)
        if self.run.batch == 0:
            self.as_tuple = isinstance(out, tuple)
            rest = tuple(out[1:]) if self.as_tuple else ()
            own = len(self.seen) == 1 and first_output(out) is self.seen[0]
            self.rest = rest if own and all(r is None for r in rest) else None
        return out


class _Stage:
    """The probes of one pass: the first module not yet pruned that the block calls opens the stage; every
    module not yet pruned fed that same tensor object joins it and has its input recorded; the first one fed
    anything else ends the pass (from the second batch on, the stage's last member does)."""

    def __init__(self, run: TrueSequentialRun, hessian: bool) -> None:
        self.run, self.hessian = run, hessian
        self.entries: dict[int, InputStatistics] = {}
        self.members: list[int] = []  # in call order, learnt from the first batch
        self.batches = 0
        self.seen = 0
        self.tensor: torch.Tensor | None = None
        self.part = None
        self.diverged = False  # a module not yet pruned was fed another tensor: the rest of the pass is void
        self.kept: list[torch.Tensor] = []  # the stage's input per batch (kept for a one-projection stage)

    def start_batch(self) -> None:
        self.batches += 1
        if len(self.members) > 1:  # only a one-projection stage's inputs are kept
            self.kept = []
        self.seen, self.tensor, self.part, self.diverged = 0, None, None, False

    def forward_of(self, module: nn.Module) -> Callable:
        key = id(module)
        width = out_features(module)

        def forward(x, *_args, **_kwargs):
            if self.tensor is None:
                self.tensor = x  # held, so its memory cannot be reused by another tensor during the pass
            if x is self.tensor and not self.diverged:
                self._record(key, x)
            elif self.run.can_stop:
                raise StopForward
            else:
                self.diverged = True
            if self.run.can_stop and self.batches > 1 and self.seen == len(self.members):
                raise StopForward
            return x.new_zeros(*x.shape[:-1], width)

        return forward

    def _record(self, key: int, x: torch.Tensor) -> None:
        if self.batches == 1:
            if key in self.entries:  # called twice with one tensor: not a stage this probe understands
                raise RuntimeError(f"true_sequential: {self.run.names[key]} is called twice in one block pass")
            self.members.append(key)
            module = self.run.modules[key]
            self.entries[key] = InputStatistics(self.run.names[key], in_features(module), self.hessian,
                                                device=module.weight.device)  # fmt: skip
        elif key not in self.entries:
            return  # a batch took another path than the first: record only the first batch's stage
        if self.part is None:  # q/k/v (gate/up) share one computation of the tensor's contribution
            self.part = self.entries[key].contribution(x)
            if self.run.can_stop and len(self.members) == 1:
                self.kept.append(x.detach().clone())  # a copy: the block may write into x after the probe
        self.entries[key].add(self.part)
        self.seen += 1


@contextmanager
def _forward_replaced(module: nn.Module, forward: Callable):
    """``module``'s forward replaced for the duration; its hooks (DeepSpeed's too) still run around it."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def _inside_any(module: nn.Module, sealed: dict[int, nn.Module], key: int) -> bool:
    """Whether ``module`` lies inside a sealed submodule other than itself (that one is cached instead)."""
    return any(other is not module and any(m is module for m in other.modules())
               for k, other in sealed.items() if k != key)  # fmt: skip


def _copied(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_copied(v) for v in value)
    return value
