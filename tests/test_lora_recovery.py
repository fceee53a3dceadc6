"""LoRARecovery in tiny CPU fits: only the adapter trains, the merge keeps the exact zero pattern and equals
W + mask * (scale * B A) computed here from the adapter tensors, names come back plain, the adapter saves in peft
format, GPT-2 Conv1D works, bad targets fail clearly, and a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from conftest import TARGET_PARAMS, ResumableBatches, TinyLM, make_gpt2, make_llama, random_batches
from lightning.pytorch.callbacks import ModelCheckpoint

from mosaic_lightning import CompactOnFitEnd, LoRARecovery, MosaicPruning
from mosaic_lightning.callbacks.lora_recovery import merge_keeping_sparsity
from mosaic_lightning.core.masks import canonical_name
from mosaic_lightning.schedules import Gradual

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

R, ALPHA = 4, 8.0
SCALE = ALPHA / R


class Spy(L.Callback):
    """Base weights (by HF name) and adapter tensors at train start and at train end, before the merge.
    Placed before LoRARecovery, so its on_train_end runs first."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.start = _weights(pl_module.model)

    def on_train_end(self, trainer, pl_module):
        self.end = _weights(pl_module.model)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}


def _pruning(**kwargs) -> MosaicPruning:
    """Own calibration batches, so calibration does not advance the (resumable) training loader."""
    return MosaicPruning(sparsity=0.5, method="wanda", allocation="uniform", calibration_dataloader=random_batches(),
                         verbose=False, **kwargs)  # fmt: skip


def _trainer(callbacks: list, max_steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def _fit(callbacks: list, builder=make_llama, max_steps: int = 4, ckpt_path=None, **kwargs) -> TinyLM:
    torch.manual_seed(0)
    module = TinyLM(builder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(callbacks, max_steps, **kwargs).fit(module, ResumableBatches(), ckpt_path=ckpt_path)
    return module


def _lora_modules(weights: dict[str, torch.Tensor]) -> set[str]:
    return {n.split(".lora_A.")[0] for n in weights if ".lora_A." in n}


def _expected_merge(spy: Spy, name: str, keep: torch.Tensor, transposed: bool) -> torch.Tensor:
    """W + mask * (scale * B A) from the adapter tensors seen before the merge (Conv1D stores W transposed)."""
    module = name.removesuffix(".weight")
    delta = spy.end[f"{module}.lora_B.default.weight"] @ spy.end[f"{module}.lora_A.default.weight"] * SCALE
    return spy.end[name] + keep * (delta.t() if transposed else delta)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """One 4-step LoRA recovery on tiny Llama with an adapter dir, shared by the tests below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped, so set here too (see conftest._single_thread)
    try:
        adapter_dir = tmp_path_factory.mktemp("lora") / "adapter"
        pruning, spy = _pruning(), Spy()
        lora = LoRARecovery(r=R, alpha=ALPHA, adapter_dir=str(adapter_dir))
        module = _fit([pruning, spy, lora])
    finally:
        torch.set_num_threads(threads)
    return module, pruning, spy, lora, adapter_dir


def test_only_the_adapter_trains(llama_run):
    _, pruning, spy, _, _ = llama_run
    lora = {n for n in spy.start if ".lora_" in n}
    assert _lora_modules(spy.start) == {n.removesuffix(".weight") for n in TARGET_PARAMS["llama"]}
    for name, before in spy.start.items():
        if name in lora:
            continue
        assert torch.equal(spy.end[name], before), f"{name} changed"  # bit-identical base
    assert all(not torch.equal(spy.end[n], spy.start[n]) for n in lora if ".lora_B." in n)  # adapters moved


def test_merge_keeps_the_exact_zero_pattern(llama_run):
    module, pruning, spy, _, _ = llama_run
    params = dict(module.model.named_parameters())
    for name in TARGET_PARAMS["llama"]:
        keep = pruning.masks.masks[name]
        assert torch.equal(spy.start[name] == 0, ~keep), name  # pattern right after pruning
        assert torch.equal(params[name] == 0, ~keep), name  # same positions, hence the same count, after merging
    zeros = sum(int((params[n] == 0).sum()) for n in TARGET_PARAMS["llama"])
    assert zeros == pruning.masks.num_pruned() == sum(params[n].numel() for n in TARGET_PARAMS["llama"]) // 2


def test_merged_weights_equal_masked_formula(llama_run):
    module, pruning, spy, _, _ = llama_run
    params = dict(module.model.named_parameters())
    for name in TARGET_PARAMS["llama"]:
        expected = _expected_merge(spy, name, pruning.masks.masks[name], transposed=False)
        torch.testing.assert_close(params[name].detach(), expected, rtol=0, atol=1e-7, msg=name)
        assert not torch.equal(params[name], spy.end[name])  # the merge did change the kept weights


def test_merged_model_is_the_plain_hf_model(llama_run):
    module, *_ = llama_run
    assert type(module.model).__name__ == "LlamaForCausalLM"
    names = [n for n, _ in module.model.named_parameters()]
    assert names == [n for n, _ in make_llama().named_parameters()]
    assert set(module.model.state_dict()) == set(make_llama().state_dict())
    assert all(p.requires_grad for p in module.model.parameters())  # flags restored after the frozen phase


def test_adapter_dir_loads_with_peft(llama_run):
    from peft import PeftModel

    _, _, spy, lora, adapter_dir = llama_run
    assert lora.merged and not lora.attached
    assert (adapter_dir / "adapter_config.json").exists() and not any(adapter_dir.parent.glob(".adapter.tmp-*"))
    loaded = PeftModel.from_pretrained(make_llama(), adapter_dir)
    adapter = {n: p for n, p in _weights(loaded).items() if ".lora_" in n}
    assert adapter.keys() == {n for n in spy.end if ".lora_" in n}
    for name, value in adapter.items():
        assert torch.equal(value, spy.end[name]), name


def test_gpt2_conv1d_with_lora_listed_first():
    """GPT-2 Conv1D (stored [in, out]) and LightningCLI's order: LoRARecovery before MosaicPruning."""
    pruning, spy = _pruning(), Spy()
    lora = LoRARecovery(r=R, alpha=ALPHA, targets=["q", "down"])
    module = _fit([lora, spy, pruning], builder=make_gpt2, max_steps=3)
    params = dict(module.model.named_parameters())
    adapted = {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.0.mlp.c_proj",
               "transformer.h.1.mlp.c_proj"}  # fmt: skip
    assert type(module.model).__name__ == "GPT2LMHeadModel"
    for name in TARGET_PARAMS["gpt2"]:
        keep = pruning.masks.masks[name]
        assert torch.equal(params[name] == 0, ~keep), name
        assert torch.equal(spy.start[name] == 0, ~keep), name
    for module_name in adapted:  # the frozen base moved only by the masked merge
        name = f"{module_name}.weight"
        assert not torch.equal(params[name], spy.start[name])
    assert torch.equal(params["transformer.h.0.attn.c_proj.weight"], spy.start["transformer.h.0.attn.c_proj.weight"])


def test_gpt2_merge_formula_transposes_conv1d():
    pruning, spy = _pruning(), Spy()
    module = _fit([pruning, spy, LoRARecovery(r=R, alpha=ALPHA, targets=["up"])], builder=make_gpt2, max_steps=2)
    params = dict(module.model.named_parameters())
    for name in ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"):
        expected = _expected_merge(spy, name, pruning.masks.masks[name], transposed=True)
        torch.testing.assert_close(params[name].detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_composite_units_stay_removed_and_compact_after_the_merge():
    """Removed MLP channels / heads are masked too, so the merge leaves them zero; the merge happens in
    on_train_end, so CompactOnFitEnd (even listed first) compacts the merged plain model in on_fit_end."""
    pruning = _pruning(structured_fraction=0.6, uniform_structure=True)
    seen: dict[str, bool] = {}

    class Check(L.Callback):
        def on_fit_end(self, trainer, pl_module):
            params = dict(pl_module.model.named_parameters())
            seen["pattern"] = all(torch.equal(params[n] == 0, ~pruning.masks.masks[n]) for n in TARGET_PARAMS["llama"])
            layer = pl_module.model.model.layers[0]
            seen["units"] = bool(pruning.structure["0.mlp"]) and not any(
                layer.mlp.up_proj.weight[c].any() or layer.mlp.down_proj.weight[:, c].any()
                for c in pruning.structure["0.mlp"]
            )

    module = _fit([Check(), CompactOnFitEnd(), pruning, LoRARecovery(r=R, alpha=ALPHA)], max_steps=2)
    assert seen == {"pattern": True, "units": True}
    assert pruning.compacted and module.model.model.layers[0].mlp.up_proj.out_features < 128
    assert module.model(input_ids=random_batches(1)[0]).logits.isfinite().all()


def test_merge_false_keeps_the_peft_model_for_a_later_masked_merge():
    pruning = _pruning()
    module = _fit([pruning, LoRARecovery(r=R, alpha=ALPHA, merge=False)], max_steps=2)
    assert type(module.model).__name__ == "PeftModelForCausalLM"
    merged = merge_keeping_sparsity(module.model, pruning.masks)
    params = dict(merged.named_parameters())
    assert all(torch.equal(params[n] == 0, ~pruning.masks.masks[n]) for n in TARGET_PARAMS["llama"])


class LogitsAtTrainEnd(L.Callback):
    """The trained model's logits on fixed ids at train end, before LoRARecovery's merge (listed before it)."""

    def __init__(self) -> None:
        self.ids = random_batches(1, seed=9)[0]
        self.logits: torch.Tensor | None = None

    def on_train_end(self, trainer, pl_module):
        pl_module.model.eval()  # GPT-2 has dropout
        with torch.no_grad():
            self.logits = pl_module.model(input_ids=self.ids).logits.clone()
        pl_module.model.train()


@pytest.mark.parametrize("builder", [make_llama, make_gpt2], ids=["llama", "gpt2-conv1d"])
def test_masked_update_makes_the_merged_model_the_trained_one(builder):
    """With the update trained through the masks, the merge changes nothing the model computes; with peft's
    plain forward (masked_update=False) the merge cuts the update where the mask is zero and the logits move."""
    moved = {}
    for masked in (True, False):
        spy, pruning = LogitsAtTrainEnd(), _pruning()
        module = _fit([pruning, spy, LoRARecovery(r=R, alpha=ALPHA, masked_update=masked)], builder=builder,
                      max_steps=4)  # fmt: skip
        params = dict(module.model.named_parameters())
        assert all(torch.equal(params[n] == 0, ~pruning.masks.masks[n]) for n in TARGET_PARAMS[module.model.config
                   .model_type])  # fmt: skip
        with torch.no_grad():
            merged = module.model.eval()(input_ids=spy.ids).logits
        moved[masked] = float((merged - spy.logits).abs().max())
    assert moved[True] < 1e-5 < 1e-3 < moved[False], moved


def test_lora_on_a_projection_that_was_not_pruned_fails():
    with pytest.raises(ValueError, match=r"targets=\['o'\].*does not prune: \['o'\].*pruned projections: \['k', 'q'\]"):
        _fit([_pruning(targets=["q", "k"]), LoRARecovery(targets=["o"])], max_steps=1)


def test_needs_mosaic_pruning_with_one_shot_at_fit_start():
    with pytest.raises(RuntimeError, match="needs a MosaicPruning callback"):
        _fit([LoRARecovery()], max_steps=1)
    gradual = _pruning(schedule=Gradual(initial_sparsity=0.1, start_step=0, end_step=2, every_n_steps=1))
    with pytest.raises(RuntimeError, match="one-shot prune at fit start.*schedule=Gradual"):
        _fit([gradual, LoRARecovery()], max_steps=3)


def test_max_steps_zero_leaves_the_plain_pruned_model():
    pruning = _pruning()
    module = _fit([pruning, LoRARecovery()], max_steps=0)  # attached at fit start, merged at fit end
    assert type(module.model).__name__ == "LlamaForCausalLM"
    params = dict(module.model.named_parameters())
    assert all(torch.equal(params[n] == 0, ~pruning.masks.masks[n]) for n in TARGET_PARAMS["llama"])


def _resumable_run(max_steps: int, ckpt_path=None, checkpoint_dir=None, lora_first=False):
    lora = LoRARecovery(r=R, alpha=ALPHA)
    callbacks = [lora, _pruning()] if lora_first else [_pruning(), lora]
    if checkpoint_dir is not None:  # what a job that is later killed leaves behind: a checkpoint per epoch
        callbacks.append(
            ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
        )
    module = _fit(callbacks, max_steps=max_steps, ckpt_path=ckpt_path, enable_checkpointing=checkpoint_dir is not None)
    return module, lora


@pytest.mark.parametrize("lora_first", [False, True], ids=["pruning-first", "cli-order"])
def test_resume_mid_recovery_equals_uninterrupted_run(tmp_path, lora_first):
    full, _ = _resumable_run(max_steps=8, checkpoint_dir=tmp_path, lora_first=lora_first)
    mid = tmp_path / "epoch=0-step=4.ckpt"
    checkpoint = torch.load(mid, weights_only=False)
    saved = {canonical_name(k.removeprefix("model.")) for k in checkpoint["state_dict"]}  # the adapter is module state
    assert len({k for k in saved if ".lora_" in k}) == 2 * len(TARGET_PARAMS["llama"])
    assert {k for k in saved if ".lora_" not in k} == set(make_llama().state_dict())

    resumed, lora = _resumable_run(max_steps=8, ckpt_path=mid, lora_first=lora_first)
    assert lora.merged
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_resume_with_other_adapter_settings_fails(tmp_path):
    _resumable_run(max_steps=4, checkpoint_dir=tmp_path)
    ckpt = tmp_path / "epoch=0-step=4.ckpt"
    with pytest.raises(ValueError, match=r"alpha=4.0 differs from the checkpoint's alpha=8.0"):
        _fit([_pruning(), LoRARecovery(r=R, alpha=4.0)], max_steps=8, ckpt_path=ckpt)
    with pytest.raises(ValueError, match=r"masked_update=False differs from the checkpoint's masked_update=True"):
        _fit([_pruning(), LoRARecovery(r=R, alpha=ALPHA, masked_update=False)], max_steps=8, ckpt_path=ckpt)
    # Another rank changes the adapter's shapes: the module weights refuse to load, naming the tensor.
    with pytest.raises(RuntimeError, match=r"lora_A.*torch.Size\(\[4, 64\]\) from checkpoint.*torch.Size\(\[8, 64\]\)"):
        _fit([_pruning(), LoRARecovery(r=8, alpha=ALPHA)], max_steps=8, ckpt_path=ckpt)


BAD_ARGS = [
    ({"r": 0}, "r=0"),
    ({"r": 2.5}, "r=2.5"),
    ({"r": True}, "r=True"),
    ({"alpha": 0}, "alpha=0"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"dropout": -0.1}, "dropout=-0.1"),
    ({"targets": []}, "targets=[]"),
    ({"targets": "q"}, "targets='q'"),
    ({"targets": ["query"]}, "targets item 'query'; allowed short names: ['q', 'k', 'v', 'o', 'gate', 'up', 'down']"),
    ({"targets": ["model.layers.(0"]}, "targets item 'model.layers.(0' is not a valid regular expression"),
    ({"merge": "yes"}, "merge='yes'"),
    ({"masked_update": "yes"}, "masked_update='yes'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGS)
def test_init_rejects_bad_args_naming_the_field(kwargs, message):
    with pytest.raises((ValueError, TypeError)) as info:
        LoRARecovery(**kwargs)
    assert message in str(info.value)


def test_refuses_a_non_empty_adapter_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="adapter_dir="):
        LoRARecovery(adapter_dir=str(tmp_path))
    LoRARecovery(adapter_dir=str(tmp_path / "new"))  # a new or empty directory is fine


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_through_the_adapter_equals_pruning_the_plain_model(method):
    """LoRA is attached before pruning (B = 0): the wrapper must not change a single mask entry or weight."""
    from peft import LoraConfig, get_peft_model

    from mosaic_lightning import PruningConfig, prune_model

    torch.manual_seed(0)
    plain = make_llama()
    wrapped = get_peft_model(copy.deepcopy(plain), LoraConfig(r=R, target_modules=["q_proj", "up_proj", "down_proj"]))
    config = PruningConfig(0.5, method, "mosaic")
    expected = prune_model(plain, random_batches(), config, progress=False)
    got = prune_model(wrapped, random_batches(), config, progress=False)
    assert got.masks.masks.keys() == expected.masks.masks.keys() == set(TARGET_PARAMS["llama"])
    weights = _weights(wrapped)
    for name, keep in expected.masks.masks.items():
        assert torch.equal(got.masks.masks[name], keep), name
        torch.testing.assert_close(weights[name], plain.state_dict()[name], rtol=0, atol=0, msg=name)
