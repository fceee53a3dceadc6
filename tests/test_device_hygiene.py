"""Device hygiene of the block loop with an execution device set (``BlockResidency(adapter, device)``, what
``MosaicPruning(device=...)`` builds), checked on the CPU: no host round-trip per projection or per calibration
batch, statistics made on the execution device, non-blocking host-to-device moves, pending results not read back.

Host syncs are counted by patching the Tensor methods that wait for a device result (``item``, ``tolist``,
``cpu``, ``numpy`` and the implicit ``bool()``/``int()``/``float()``/``index`` conversions) between the residency's
``load(l)`` and ``unload(l)``: everything the engine does for block ``l``. On the CPU nothing actually waits, but
every one of these calls is a stall on a GPU, so the counts are what a GPU run would pay. The bounds are per block
and independent of the number of calibration batches and of the block's projections:

- one NaN/inf check per statistics pass (:func:`~mosaic_lightning.calibration.stats.check_finite`; the
  true-sequential order has four passes per Llama block: q/k/v, o, gate/up, down);
- one exact-count check of the block's masks (``engine._check_results``);
- with an outlier allocation's profile pass (OWL), one more for the block's outlier ratios;
- ``.cpu()`` exactly once per pending result (keep mask, and new weights for reconstructing methods): results are
  held in host files until the commit (:mod:`~mosaic_lightning.pruning.spill`), a device-to-host copy each.

A sync added per weight matrix (7 per Llama block) or per batch breaks these bounds.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import random_batches
from transformers import LlamaConfig, LlamaForCausalLM

from mosaic_lightning import PruningConfig, prune_model
from mosaic_lightning.calibration import stats as stats_module
from mosaic_lightning.core.adapters import ModelAdapter
from mosaic_lightning.core.residency import BlockResidency
from mosaic_lightning.pruning.spill import SpilledTensors

SYNCS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _model(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    return LlamaForCausalLM(config).eval()


class CountingResidency(BlockResidency):
    """Execution device ``cpu``; records host syncs per block between ``load`` and ``unload``."""

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__(adapter, "cpu")
        self.layer: int | None = None
        self.syncs: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    def load(self, layer: int) -> None:
        super().load(layer)
        self.layer = layer

    def unload(self, layer: int) -> None:
        self.layer = None
        super().unload(layer)


@pytest.fixture
def counted(monkeypatch):
    """Patches the syncing Tensor methods; returns a function that runs prune_model with a counting residency."""
    active: list[CountingResidency] = []

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, **kwargs):
            if active and active[0].layer is not None:
                active[0].syncs[active[0].layer][name] += 1
            return original(self, *args, **kwargs)

        return counting

    for name in (*SYNCS, "cpu"):
        monkeypatch.setattr(torch.Tensor, name, wrap(name))

    def run(config: PruningConfig, batches: int = 4, layers: int = 3) -> CountingResidency:
        model = _model(layers)
        adapter = ModelAdapter(model)
        residency = CountingResidency(adapter)
        active.append(residency)
        try:
            prune_model(model, random_batches(num=batches), config, adapter=adapter, progress=False,
                        residency=residency)  # fmt: skip
        finally:
            active.clear()
        return residency

    return run


# (method, allocation, options, syncs per block besides .cpu, pending results per projection)
CASES = [
    ("magnitude", "uniform", {}, 1, 1),  # no statistics: the count check only
    ("wanda", "uniform", {}, 2, 1),  # one statistics pass + the count check
    ("sparsegpt", "uniform", {}, 2, 2),  # the Hessian pass + the count check; new weights spilled too
    ("sparsellm", "uniform", {}, 2, 2),
    ("wanda", "uniform", {"true_sequential": True}, 5, 1),  # four staged passes + the count check
    ("sparsegpt", "owl", {}, 4, 2),  # + the profile pass's check and its outlier ratios
    ("wanda", "uniform", {"pattern": "2:4"}, 2, 1),
]


@pytest.mark.parametrize(("method", "allocation", "options", "bound", "per_projection"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{'-'.join(c[2]) or 'plain'}" for c in CASES])  # fmt: skip
def test_host_syncs_per_block_are_bounded_and_do_not_grow_with_batches(counted, method, allocation, options, bound,
                                                                        per_projection):  # fmt: skip
    config = dict(sparsity=0.5, method=method, allocation=allocation, **options)
    few = counted(PruningConfig(**config), batches=2)
    many = counted(PruningConfig(**config), batches=6)
    projections = 7  # q, k, v, o, gate, up, down
    for layer in (1, 2):  # block 0 also embeds the calibration batches (transformers' own mask code syncs there)
        counts = many.syncs[layer]
        syncs = sum(n for name, n in counts.items() if name != "cpu")
        assert syncs <= bound, f"block {layer}: {dict(counts)}"
        assert counts["cpu"] == projections * per_projection, f"block {layer}: {dict(counts)}"
        assert counts == few.syncs[layer], "host syncs grew with the number of calibration batches"


def test_the_counter_sees_a_sync_added_per_weight_matrix(counted, monkeypatch):
    """The bound above fails if a method reads one value back per projection (here: Wanda's scores' maximum)."""
    from mosaic_lightning.methods import wanda

    original = wanda.wanda_scores

    def syncing(weight, column_norms):
        scores = original(weight, column_norms)
        scores.max().item()  # the kind of per-projection host read-back the bound must catch
        return scores

    monkeypatch.setattr(wanda, "wanda_scores", syncing)
    residency = counted(PruningConfig(sparsity=0.5, method="wanda"))
    syncs = sum(n for name, n in residency.syncs[1].items() if name != "cpu")
    assert syncs == 2 + 7


def test_statistics_are_made_on_the_execution_device(monkeypatch):
    """Every statistics buffer is allocated where the block runs (the residency's device), never on a default
    device; float64 column sums and float32 Hessians."""
    made = []
    original = stats_module.InputStatistics.__init__

    def spy(self, name, in_features, hessian, device="cpu"):
        original(self, name, in_features, hessian, device)
        made.append((torch.device(device), self.sq_sum, self.xxt))

    monkeypatch.setattr(stats_module.InputStatistics, "__init__", spy)
    model = _model()
    adapter = ModelAdapter(model)
    residency = BlockResidency(adapter, "cpu")
    prune_model(model, random_batches(), PruningConfig(0.5, "sparsegpt"), adapter=adapter, progress=False,
                residency=residency)  # fmt: skip
    assert len(made) == 3 * 7  # one per projection module and block (q/k/v share the computation, not the sums)
    for device, sq_sum, xxt in made:
        assert device == residency.device and sq_sum.device == residency.device and xxt.device == residency.device
        assert sq_sum.dtype == torch.float64 and xxt.dtype == torch.float32


def test_blocks_and_activations_move_to_the_device_without_blocking(monkeypatch):
    """``load`` moves a block host-to-device with ``non_blocking=True``, as are the calibration activations;
    ``unload`` copies back blocking (the host reads those weights next)."""
    model = _model()
    adapter = ModelAdapter(model)
    blocks = {id(b): i for i, b in enumerate(adapter.blocks)}
    moves: list[tuple[int, bool]] = []
    module_to, tensor_to = torch.nn.Module.to, torch.Tensor.to

    def block_to(self, *args, **kwargs):
        if id(self) in blocks:
            moves.append((blocks[id(self)], kwargs.get("non_blocking", False)))
        return module_to(self, *args, **kwargs)

    activations: list[bool] = []

    def tensor_to_spy(self, *args, **kwargs):
        import inspect

        if inspect.currentframe().f_back.f_code.co_filename.endswith("residency.py"):
            activations.append(kwargs.get("non_blocking", False))
        return tensor_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", block_to)
    monkeypatch.setattr(torch.Tensor, "to", tensor_to_spy)
    residency = BlockResidency(adapter, "cpu")
    prune_model(model, random_batches(), PruningConfig(0.5, "wanda"), adapter=adapter, progress=False,
                residency=residency)  # fmt: skip
    loads = [non_blocking for layer, non_blocking in moves[0::2]]
    unloads = [non_blocking for layer, non_blocking in moves[1::2]]
    assert [layer for layer, _ in moves] == [0, 0, 1, 1, 2, 2]
    assert all(loads) and not any(unloads)
    assert activations and all(activations)


def test_pending_results_are_read_back_once_per_block_not_copied_around(monkeypatch):
    """Each block's pending keep masks (and new weights) are read from their host files once, to run the block
    as pruned for the next block's inputs, and then only at the commit: moving them "off the execution device"
    after the block changes only where they are read back to, it copies nothing."""
    reads: list[int | None] = []
    original = SpilledTensors.__getitem__
    residency_layer: list[int | None] = [None]

    def spy(self, key):
        reads.append(residency_layer[0])
        return original(self, key)

    monkeypatch.setattr(SpilledTensors, "__getitem__", spy)

    class Tracking(BlockResidency):
        def load(self, layer):
            super().load(layer)
            residency_layer[0] = layer

        def unload(self, layer):
            super().unload(layer)
            residency_layer[0] = None

    model = _model()
    adapter = ModelAdapter(model)
    prune_model(model, random_batches(), PruningConfig(0.5, "sparsegpt"), adapter=adapter, progress=False,
                residency=Tracking(adapter, "cpu"))  # fmt: skip
    by_block = collections.Counter(reads)
    # block l's results (7 keeps + 7 new weights) are read once while it is loaded, to compute its pruned outputs
    # (the next block's inputs); the last block's outputs are never needed. Membership tests and the move off the
    # device read nothing. After the loop the commit reads each keep twice (to write the new weights, then for the
    # mask store) and each new weight once (outside any block: None).
    assert by_block[0] == by_block[1] == 14 and by_block[2] == 0
    assert by_block[None] == 3 * (7 * 2 + 7)
