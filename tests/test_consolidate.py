"""consolidated_copy on one process: an independent plain copy, LoRA merged keeping sparsity, ties and buffers kept.
(The ZeRO-3 path, gathering one module at a time on 2 ranks, is in test_deepspeed.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TARGET_PARAMS, make_gpt2, make_llama, make_opt, random_batches

from mosaic_lightning import PruningConfig, compact_model, prune_model
from mosaic_lightning.callbacks.lora_recovery import merge_keeping_sparsity
from mosaic_lightning.core.consolidate import consolidated_copy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _pruned(builder, **config):
    torch.manual_seed(0)
    model = builder()
    outcome = prune_model(model, random_batches(), PruningConfig(0.5, **config), progress=False)
    return model, outcome


def _lora(model, modules, fan_in_fan_out=False):
    from peft import LoraConfig, get_peft_model

    # Random B (init_lora_weights=False), so the adapter really changes the function.
    config = LoraConfig(r=4, target_modules=modules, init_lora_weights=False, fan_in_fan_out=fan_in_fan_out)
    return get_peft_model(model, config)


def test_plain_model_copies_exactly_and_independently():
    model, outcome = _pruned(make_gpt2, structured_fraction=0.5, uniform_structure=True)
    copied = consolidated_copy(model, outcome.masks, keep=True)
    assert type(copied) is type(model) and copied is not model
    for name, value in model.state_dict().items():
        assert torch.equal(copied.state_dict()[name], value), name
        assert copied.state_dict()[name].data_ptr() != value.data_ptr()
    assert copied.lm_head.weight is copied.transformer.wte.weight  # GPT-2 ties its embeddings
    ids = random_batches(1)[0]
    torch.testing.assert_close(copied(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    config = model.config.to_dict()
    compact_model(copied, outcome.structure)
    assert copied.transformer.h[0].mlp.c_fc.nf < model.transformer.h[0].mlp.c_fc.nf
    assert model.config.to_dict() == config != copied.config.to_dict()  # the live config is untouched


@pytest.mark.parametrize("builder", [make_llama, make_opt], ids=["llama", "opt"])
def test_other_architectures_copy_exactly(builder):
    model, outcome = _pruned(builder)
    copied = consolidated_copy(model, outcome.masks, keep=True)
    ids = random_batches(1)[0]
    torch.testing.assert_close(copied(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert all(torch.equal(copied.state_dict()[n], v) for n, v in model.state_dict().items())


@pytest.mark.parametrize("merged", [False, True], ids=["adapter-unmerged", "merged-wrapper"])
@pytest.mark.parametrize(
    ("builder", "modules", "fan_in_fan_out"),
    [(make_llama, ["q_proj", "down_proj"], False), (make_gpt2, ["c_attn", "c_fc"], True)],
)
def test_lora_is_merged_keeping_sparsity(builder, modules, fan_in_fan_out, merged):
    model, outcome = _pruned(builder)
    wrapped = _lora(model, modules, fan_in_fan_out)
    expected = merge_keeping_sparsity(copy.deepcopy(wrapped), outcome.masks)  # peft's merge + masks
    if merged:
        merge_keeping_sparsity(wrapped, outcome.masks, unload=False)
    copied = consolidated_copy(wrapped, outcome.masks, keep=True)
    assert type(copied) is type(expected)
    assert copied.state_dict().keys() == expected.state_dict().keys()
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(copied.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    kind = "llama" if builder is make_llama else "gpt2"
    params = dict(copied.named_parameters())
    assert all(torch.equal(params[n] == 0, ~outcome.masks.masks[n]) for n in TARGET_PARAMS[kind])


def test_other_ranks_get_nothing():
    model, outcome = _pruned(make_llama)
    assert consolidated_copy(model, outcome.masks, keep=False) is None
