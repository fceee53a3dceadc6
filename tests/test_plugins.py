"""Methods and allocations as plugins: a user's class from the user's own module runs through prune_model, the
callback and the CLI (``class_path``/``init_args``); a scores-only subclass is a complete method; block-level
methods; the engine refuses a method that misses its planned count; data-free methods run no forward pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TARGET_PARAMS, TinyLM, make_llama, random_batches, write_text_files

from mosaic_lightning import MosaicPruning, PruningConfig, prune_model
from mosaic_lightning.methods import PruneResult, PruningMethod, RandomScores

ROOT = Path(__file__).resolve().parents[1]

# A user's own module, outside the package: the method docs/adding-a-method.md, section "A method", describes.
USER_MODULE = '''
import torch
from mosaic_lightning.methods import PruningMethod


class PowerMagnitude(PruningMethod):
    """|W| ** alpha scaled per input column by ||X_j|| ** (1 - 1/alpha): alpha = 1 is Wanda-like-free magnitude."""

    def __init__(self, alpha: float = 1.0) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha={alpha}; must be > 0")
        self.alpha = alpha

    def scores(self, weight, stats):
        return weight.abs().float() ** self.alpha * stats.column_norms[None, :] ** (1 - 1 / self.alpha)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "userpkg"
    folder.mkdir()
    (folder / "my_methods.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _row_keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Independent per-row pruning: the lowest ``fraction`` of each row (stable order), rows of equal count."""
    k = int(scores.shape[1] * fraction)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, False)


class RowWeighted(PruningMethod):
    """Defined in this (user) module; implements only ``scores``."""

    def scores(self, weight, stats):
        return weight.abs().float() * torch.arange(1, weight.shape[0] + 1, dtype=torch.float32)[:, None]


def test_scores_only_subclass_is_a_complete_method():
    model, reference = make_llama(), make_llama()
    outcome = prune_model(model, random_batches(), PruningConfig(0.5, RowWeighted(), "uniform"), progress=False)
    for name in TARGET_PARAMS["llama"]:
        weight = reference.get_parameter(name)
        expected = _row_keep(RowWeighted().scores(weight, None), 0.5)
        assert torch.equal(outcome.masks.masks[name], expected), name
    assert outcome.report.achieved_sparsity == 0.5


def test_user_class_from_its_own_module_runs_in_prune_model_and_the_callback(user_module):
    config = PruningConfig(0.5, {"class_path": "my_methods.PowerMagnitude", "init_args": {"alpha": 2.0}}, "uniform")
    assert type(config.method).__module__ == "my_methods" and config.method.alpha == 2.0
    model = make_llama()
    outcome = prune_model(model, random_batches(), config, progress=False)
    assert outcome.report.config["method"] == {
        "class_path": "my_methods.PowerMagnitude", "init_args": {"alpha": 2.0}
    }  # fmt: skip
    assert outcome.report.achieved_sparsity == 0.5

    from my_methods import PowerMagnitude

    callback = MosaicPruning(sparsity=0.5, method=PowerMagnitude(alpha=2.0), allocation="uniform",
                             calibration_dataloader=random_batches(), verbose=False)  # fmt: skip
    module = TinyLM()
    L.Trainer(max_steps=0, callbacks=[callback], logger=False, enable_checkpointing=False,
              enable_progress_bar=False).fit(module, torch.utils.data.DataLoader(random_batches()[0]))  # fmt: skip
    assert torch.equal(callback.masks.masks[TARGET_PARAMS["llama"][0]], outcome.masks.masks[TARGET_PARAMS["llama"][0]])
    # Checkpoints record what ran, by class path and arguments.
    assert callback.state_dict()["config"]["method"] == {
        "class_path": "my_methods.PowerMagnitude", "init_args": {"alpha": 2.0}
    }  # fmt: skip


def test_user_class_validates_in_its_own_init(user_module):
    with pytest.raises(ValueError, match="alpha=-1"):
        PruningConfig(0.5, {"class_path": "my_methods.PowerMagnitude", "init_args": {"alpha": -1}})


def test_random_baseline_is_reproducible_exact_and_seeded():
    masks = {}
    for seed in (0, 0, 1):
        model = make_llama()
        outcome = prune_model(model, [], PruningConfig(0.6, RandomScores(seed=seed), "uniform"), progress=False)
        total = outcome.report.params_targeted
        assert outcome.report.params_pruned == round(0.6 * total)
        masks.setdefault(seed, []).append(outcome.masks.masks)
    first, again = masks[0]
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first[TARGET_PARAMS["llama"][0]], masks[1][0][TARGET_PARAMS["llama"][0]])
    # Independently: in every row the first projection prunes the lowest of the generator's first draw.
    keep = first[TARGET_PARAMS["llama"][0]]
    draw = torch.rand(keep.shape, generator=torch.Generator().manual_seed(0))
    pruned_max = draw.masked_fill(keep, -1).max(dim=1).values
    kept_min = draw.masked_fill(~keep, 2).min(dim=1).values
    assert (pruned_max < kept_min).all()


# Forwards of block 0 per batch (capturing the blocks' inputs runs the embeddings only, no block).
@pytest.mark.parametrize(("method", "allocation", "passes"), [
    ("magnitude", "uniform", 0),  # reads no statistics: not even the embedding runs
    ("random", "uniform", 0),
    ("wanda", "uniform", 2),  # one statistics pass, one run as pruned to feed block 1
    ("magnitude", "owl", 1),  # the allocation's dense profile only: one pass keeping the outputs
])  # fmt: skip
def test_only_what_is_read_is_computed(method, allocation, passes):
    model = make_llama()
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    batches = random_batches()
    prune_model(model, batches, PruningConfig(0.5, method, allocation), progress=False)
    assert len(calls) == passes * len(batches)


class CapturedWanda(PruningMethod):
    """A block-level method: reads every projection's inputs itself (``block.capture``) and scores Wanda's way."""

    def scores(self, weight, stats):
        raise AssertionError("prune_block does not use the per-projection path")

    def prune_block(self, block):
        modules = {p.key: p.module for p in block.projections}
        seen = block.capture(modules)
        results = {}
        for proj in block.projections:
            inputs = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[proj.key][0]]).double()
            norms = inputs.pow(2).sum(0).sqrt().float()
            with block.gathered(proj):
                scores = proj.weight_view().abs().float() * norms[None, :]
            results[proj.key] = PruneResult(keep=block.pattern.keep_mask(scores, block.num_prune[proj.key]))
        return results


class Greedy(PruningMethod):
    """Prunes one weight too many in every projection: the engine must refuse it."""

    def scores(self, weight, stats):
        return weight.abs().float()

    def prune(self, weight, stats, pattern, num_prune):
        return super().prune(weight, stats, pattern, num_prune + 1)


def test_block_level_method_sees_the_sequential_inputs_and_the_exact_count_contract():
    batches = random_batches()
    joint = prune_model(make_llama(), batches, PruningConfig(0.5, CapturedWanda(), "uniform"), progress=False)
    wanda = prune_model(make_llama(), batches, PruningConfig(0.5, "wanda", "uniform"), progress=False)
    for name in TARGET_PARAMS["llama"]:  # block 1 saw block 0 as pruned in both
        assert torch.equal(joint.masks.masks[name], wanda.masks.masks[name]), name
    model = make_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"Greedy\(\) pruned 2049 weights of model.layers.0.self_attn.q_proj"):
        prune_model(model, [], PruningConfig(0.5, Greedy(), "uniform"), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was committed


def test_cli_runs_a_method_from_the_users_module(tmp_path, user_module, tiny_model_dir):
    write_text_files(tmp_path)
    export = tmp_path / "export"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(user_module), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "recipes/wanda-50.yaml"),
         "--model.pretrained", str(tiny_model_dir),
         "--data.train_files", str(tmp_path / "train.txt"),  # a single path, not a list
         "--data.eval_files", str(tmp_path / "eval.txt"),
         "--data.seq_len", "32", "--data.num_calibration_samples", "4", "--data.max_eval_windows", "2",
         "--pruning.method.class_path", "my_methods.PowerMagnitude", "--pruning.method.init_args.alpha", "2",
         "--pruning.sparsity", "0.6", "--trainer.logger", "false", "--export_dir", str(export)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "pruning_report.json").read_text())
    assert report["config"]["method"] == {"class_path": "my_methods.PowerMagnitude", "init_args": {"alpha": 2.0}}
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert all(p["achieved_sparsity"] == p["requested_sparsity"] for p in report["projections"])


@pytest.mark.parametrize("value", ["sparsegpt", {"class_path": "sparsegpt", "init_args": {"mask_scope": "block"}},
                                   {"class_path": "mosaic_lightning.methods.SparseLLM", "init_args": {"iterations": 2}},
                                   RandomScores(seed=4)])  # fmt: skip
def test_recorded_config_rebuilds_the_same_method(value):
    import copy

    from mosaic_lightning.methods import resolve_method

    method = resolve_method(value)
    recorded = method.to_config()
    rebuilt = resolve_method(recorded)
    assert type(rebuilt) is type(method) and rebuilt.to_config() == recorded
    assert copy.deepcopy(method).to_config() == recorded  # Lightning may deepcopy callbacks and their options
