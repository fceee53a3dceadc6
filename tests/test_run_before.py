"""``run_before``: how callbacks act right before another object's method (the dense scores right before the prune
of a run that compacts before training), once, and undo it when the call never comes."""

from __future__ import annotations

import pytest

from mosaic_lightning.callbacks.mosaic_pruning import run_before


class Pruner:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def prune(self, sparsity: float) -> float:
        self.calls.append(f"prune {sparsity}")
        return sparsity


def test_the_action_runs_once_before_the_method_with_its_arguments():
    pruner = Pruner()
    run_before(pruner, "prune", lambda s: pruner.calls.append(f"dense scores before {s}"))
    assert pruner.prune(0.3) == 0.3
    assert pruner.prune(0.5) == 0.5
    assert pruner.calls == ["dense scores before 0.3", "prune 0.3", "prune 0.5"]
    assert "prune" not in vars(pruner)  # the method is the class's own again


def _two_wrappers(pruner: Pruner) -> list:
    return [run_before(pruner, "prune", lambda s, who=who: pruner.calls.append(who)) for who in ("ppl", "tasks")]


@pytest.mark.parametrize("undo_order", [(0, 1), (1, 0)])
def test_two_wrappers_act_once_each_whatever_order_they_are_undone_in(undo_order):
    pruner = Pruner()
    undos = _two_wrappers(pruner)
    pruner.prune(0.3)
    for i in undo_order:  # fit start undoes both, after the prune
        undos[i]()
    pruner.prune(0.5)
    assert pruner.calls == ["tasks", "ppl", "prune 0.3", "prune 0.5"]
    assert "prune" not in vars(pruner)


@pytest.mark.parametrize("undo_order", [(0, 1), (1, 0)])
def test_undone_before_the_call_neither_wrapper_acts_in_either_order(undo_order):
    pruner = Pruner()
    undos = _two_wrappers(pruner)
    for i in undo_order:  # a resumed run: no prune comes
        undos[i]()
        undos[i]()  # twice is harmless
    pruner.prune(0.5)
    assert pruner.calls == ["prune 0.5"]
