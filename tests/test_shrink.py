"""Removing structure to a size target, compacting before training, and recovering the smaller model.

Sizes are checked against parameter counts computed here from the configs' own numbers; the compacted model
against the masked one; training, export and resume through a real ``Trainer``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import transformers as T
from conftest import ResumableBatches, TinyLM, make_gpt2, make_llama, make_opt, random_batches

from mosaic_lightning import MosaicPruning, PruningConfig, compact_model, prune_model, save_pruned

_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip


def _gemma3_640():
    """Gemma-3 shaped like the 270M model: 4 query heads, 1 key/value head, hidden size 640 (3 heads: 640 % 3)."""
    torch.manual_seed(0)
    config = T.Gemma3TextConfig(hidden_size=640, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=32, vocab_size=128)  # fmt: skip
    return T.Gemma3ForCausalLM(config).eval()


FAMILIES = {
    "llama": make_llama,
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_SIZES)).eval(),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_SIZES)).eval(),
    "gemma3-640": _gemma3_640,
    "opt": make_opt,
    "gpt2": make_gpt2,
}
INPUT = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(5))


def _shrink(sparsity: float = 0.3, **overrides) -> PruningConfig:
    options = {"sparsity": sparsity, "method": "wanda", "allocation": "uniform", "structured_fraction": 1.0,
               "uniform_structure": True, "whole_units": True, **overrides}  # fmt: skip
    return PruningConfig(**options)


def _llama_projection_params(heads_kept: int, mlp_kept: int, layers: int = 2) -> int:
    """q, k, v, o, gate, up, down of the tiny Llama (hidden 64, head_dim 16, 2 key/value heads), by hand."""
    hidden, head_dim, kv = 64, 16, 2
    attention = 2 * hidden * heads_kept * head_dim + 2 * hidden * kv * head_dim
    return layers * (attention + 3 * hidden * mlp_kept)


def test_whole_units_remove_at_least_the_share_asked_and_leave_no_single_zeros():
    model = make_llama()
    outcome = prune_model(model, random_batches(), _shrink(0.3), progress=False)
    assert outcome.report.achieved_sparsity >= 0.3
    assert outcome.report.metrics["kept_heads_per_layer"] and outcome.report.metrics["kept_mlp_per_layer"]
    compact_model(model, outcome.structure)
    for name, param in model.named_parameters():
        if "proj" in name:  # whole units only: nothing zero is left in the compacted projections
            assert (param != 0).all(), name


def test_size_target_is_the_closest_size_not_above_it():
    dense = make_llama().num_parameters()
    embeddings = 2 * 128 * 64 + 2 * 2 * 64 + 64  # embed, lm_head, two norms per layer, final norm
    assert dense == embeddings + _llama_projection_params(4, 128)
    target = round(0.8 * dense)
    model = make_llama()
    outcome = prune_model(model, random_batches(), _shrink(target_params=0.8), progress=False)
    compact_model(model, outcome.structure)
    size = model.num_parameters()
    assert size <= target
    heads = model.config.num_attention_heads
    mlp = model.config.intermediate_size
    assert size == embeddings + _llama_projection_params(heads, mlp)
    # one MLP channel fewer removed in every layer would be above the target: the closest size not above it
    assert embeddings + _llama_projection_params(heads, mlp + 1) > target
    assert outcome.report.metrics["params_planned"] == size
    assert outcome.report.metrics["params_target"] == target


@pytest.mark.parametrize(("family", "fraction"), [("gpt2", 0.8), ("gpt2", 0.45), ("opt", 0.8), ("opt", 0.6)])
def test_size_target_counts_the_bias_entries_a_unit_takes_with_it(family, fraction):
    """GPT-2 and OPT have projection biases: an MLP channel is 2 x hidden weights plus its first projection's bias
    entry, so the size is the closest not above the target only if the plan counts those entries too (GPT-2 at
    0.45 removes more than 2 x hidden channels per layer, where weights-only planning is a channel per layer off
    even with the rounding up counting them)."""
    model = FAMILIES[family]()
    target = round(fraction * model.num_parameters())
    outcome = prune_model(model, random_batches(), _shrink(target_params=fraction), progress=False)
    compact_model(model, outcome.structure)
    size = model.num_parameters()
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    channel = 2 * hidden + 1
    assert size <= target < size + layers * channel
    assert outcome.report.metrics["params_planned"] == size


@pytest.mark.parametrize("fraction", [0.8, 0.45])
def test_a_per_layer_size_target_is_within_one_channel_of_it(fraction):
    """The energy allocation gives each layer its own size; with biases counted, one more channel kept anywhere
    would be above the target."""
    model = make_gpt2()
    target = round(fraction * model.num_parameters())
    config = _shrink(target_params=fraction, allocation="energy", uniform_structure=False)
    compact_model(model, prune_model(model, random_batches(), config, progress=False).structure)
    size = model.num_parameters()
    assert size <= target < size + 2 * model.config.hidden_size + 1


@pytest.mark.parametrize(
    ("target", "message"),
    [(0.9999999, r"not fewer than the dense model's"), (10**9, r"not fewer than the dense model's"),
     (0.01, r"out of reach: removing every unit that may go"), (1.5, r"allowed values"), (-0.2, r"allowed values")],
)  # fmt: skip
def test_impossible_size_targets_are_refused_before_any_weight_changes(target, message):
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"target_params=.*" + message):
        prune_model(model, random_batches(), _shrink(target_params=target), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_target_and_whole_units_need_their_companions():
    with pytest.raises(ValueError, match="target_params needs whole_units=True"):
        PruningConfig(structured_fraction=1.0, target_params=0.8)
    with pytest.raises(ValueError, match="whole_units=True with structured_fraction=0.5"):
        PruningConfig(structured_fraction=0.5, whole_units=True)
    with pytest.raises(ValueError, match="compact_before_training=True needs whole_units=True"):
        MosaicPruning(structured_fraction=1.0, compact_before_training=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compacted_logits_equal_the_masked_models_and_the_uniform_export_loads_plainly(tmp_path, family):
    model = FAMILIES[family]()
    outcome = prune_model(model, random_batches(), _shrink(0.3), progress=False)
    assert outcome.structure
    with torch.no_grad():
        masked = model(input_ids=INPUT).logits
    compact_model(model, outcome.structure)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT).logits, masked, rtol=0, atol=1e-5)
    assert outcome.report.metrics["params_planned"] == model.num_parameters()  # said before, biases included
    save_pruned(model, None, tmp_path / "out")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.num_parameters() == model.num_parameters()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INPUT).logits, masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("family", "kept_heads"), [("gemma3-640", {4, 2, 1}), ("opt", {4}), ("gpt2", {4})])
def test_uniform_structure_keeps_only_head_counts_the_config_can_state(family, kept_heads):
    """Gemma-3 (hidden 640) cannot state 3 heads, so 0, 2 or 3 go, never 1 of 4; OPT and GPT-2 cannot state any
    smaller count, so their heads stay and MLP channels take the whole share instead of the run being refused."""
    model = FAMILIES[family]()
    outcome = prune_model(model, random_batches(), _shrink(0.3), progress=False)
    assert set(outcome.report.metrics["kept_heads_per_layer"]) <= kept_heads
    assert outcome.report.achieved_sparsity >= 0.3


def _trainer(max_steps: int, pruning: MosaicPruning, tmp_path=None, extra: tuple[L.Callback, ...] = (),
             **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, callbacks=[pruning, *extra], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=tmp_path is not None,
                     default_root_dir=tmp_path, **kwargs)  # fmt: skip


def _shrinking() -> MosaicPruning:
    return MosaicPruning(sparsity=0.3, method="wanda", allocation="uniform", structured_fraction=1.0,
                         uniform_structure=True, whole_units=True, compact_before_training=True, verbose=False,
                         calibration_dataloader=random_batches())  # fmt: skip


def test_compaction_happens_before_the_optimizer_is_built(tmp_path):
    torch.manual_seed(0)
    module = TinyLM(make_llama, lr=1e-3)
    dense_params = module.model.num_parameters()
    pruning = _shrinking()
    trainer = _trainer(3, pruning)
    trainer.fit(module, ResumableBatches())
    params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in module.parameters()}
    assert sum(p.numel() for p in params) == module.model.num_parameters() < 0.85 * dense_params
    assert pruning.compacted and pruning.report.metrics["params_after_compaction"] == module.model.num_parameters()
    save_pruned(module.model, None, tmp_path / "out")  # the trained, compacted model is what is exported
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INPUT).logits, module.model(input_ids=INPUT).logits)


class _DenseSizeBeforePrune(L.Callback):
    """What a callback measuring the dense model sees through ``run_before_dense_prune``: here, its size."""

    def __init__(self, pruning: MosaicPruning) -> None:
        self.pruning = pruning
        self.sizes: list[int] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.undo = self.pruning.run_before_dense_prune(lambda _, model, *__: self.sizes.append(model.num_parameters()))

    def on_fit_start(self, trainer, pl_module) -> None:
        self.undo()


def test_callbacks_measure_the_dense_model_right_before_the_prune_before_training():
    torch.manual_seed(0)
    module = TinyLM(make_llama, lr=1e-3)
    dense_params = module.model.num_parameters()
    pruning = _shrinking()
    probe = _DenseSizeBeforePrune(pruning)
    _trainer(1, pruning, extra=(probe,)).fit(module, ResumableBatches())
    assert probe.sizes == [dense_params] and module.model.num_parameters() < dense_params
    assert "prune" not in vars(pruning)  # unhooked after use


def test_a_run_pruning_at_fit_start_hooks_nothing_for_dense_measurements():
    pruning = MosaicPruning(sparsity=0.3, method="wanda", verbose=False, calibration_dataloader=random_batches())
    probe = _DenseSizeBeforePrune(pruning)
    _trainer(1, pruning, extra=(probe,)).fit(TinyLM(make_llama, lr=1e-3), ResumableBatches())
    assert probe.sizes == [] and "prune" not in vars(pruning)


def test_resume_mid_recovery_equals_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    whole = TinyLM(make_llama, lr=1e-3)
    _trainer(4, _shrinking()).fit(whole, ResumableBatches())

    torch.manual_seed(0)
    first = TinyLM(make_llama, lr=1e-3)
    _trainer(2, _shrinking(), tmp_path).fit(first, ResumableBatches())
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))

    torch.manual_seed(0)
    resumed = TinyLM(make_llama, lr=1e-3)  # built dense: compacted to the checkpoint's structure before loading
    pruning = _shrinking()
    _trainer(4, pruning).fit(resumed, ResumableBatches(), ckpt_path=checkpoint)
    assert pruning.compacted
    expected = whole.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_resuming_with_other_pruning_options_is_refused_naming_them(tmp_path):
    torch.manual_seed(0)
    _trainer(2, _shrinking(), tmp_path).fit(TinyLM(make_llama, lr=1e-3), ResumableBatches())
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    other = MosaicPruning(sparsity=0.4, method="wanda", allocation="uniform", structured_fraction=1.0,
                          uniform_structure=True, whole_units=True, compact_before_training=True, verbose=False,
                          calibration_dataloader=random_batches())  # fmt: skip
    with pytest.raises(ValueError, match=r"other MosaicPruning options \(sparsity=0.3 there, 0.4 here\)"):
        _trainer(4, other).fit(TinyLM(make_llama, lr=1e-3), ResumableBatches(), ckpt_path=checkpoint)


def test_a_checkpoint_from_before_an_option_existed_resumes_with_its_default():
    """A checkpoint written before ``whole_units`` and ``target_params`` existed had their defaults; it resumes
    into a callback left at those defaults and is refused, naming the option, by one that sets another value."""
    state = MosaicPruning(sparsity=0.5, method="wanda").state_dict()
    for newer in ("whole_units", "target_params"):
        del state["config"][newer]
    MosaicPruning(sparsity=0.5, method="wanda").load_state_dict(state)
    shrinking = MosaicPruning(sparsity=0.5, method="wanda", structured_fraction=1.0, whole_units=True)
    with pytest.raises(ValueError, match=r"whole_units=False there, True here"):
        shrinking.load_state_dict(state)


def test_a_size_target_prunes_once():
    from mosaic_lightning.schedules import Gradual

    with pytest.raises(ValueError, match="target_params prunes once, to a size; schedule=Gradual"):
        MosaicPruning(structured_fraction=1.0, whole_units=True, target_params=0.8,
                      schedule=Gradual(initial_sparsity=0.1, start_step=0, end_step=4))  # fmt: skip


def test_compact_before_training_is_refused_under_deepspeed_before_any_work():
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = TinyLM(make_llama)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", strategy=DeepSpeedStrategy(stage=3), devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"compact_before_training=True is not supported with strategy=DeepSpeed"):
        _shrinking().setup(trainer, module, "fit")
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items())
