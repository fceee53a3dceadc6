"""Compaction: physically remove pruned MLP channels and attention heads, so the model really shrinks.

``compact_model`` rebuilds every affected Linear (or GPT-2 Conv1D) with only the kept rows/columns and fixes
the attention module's head counts; the function is unchanged (removed units were already all-zero).
The config then records per-layer sizes in ``mosaic_layer_shapes``; when every layer has the same sizes and
the architecture's config can say so (Llama-family: ``intermediate_size``, ``num_attention_heads`` with an
explicit ``head_dim``; OPT/GPT-2: MLP width only), the standard fields are updated too and plain
``AutoModelForCausalLM.from_pretrained`` loads the result. Otherwise :func:`load_pruned` rebuilds it.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.adapters import ModelAdapter, Projection
from ..core.structure import HEADS, MLP, SHAPES_KEY, UnitGroup, attention_shape, states_heads, unit_groups

_OLD_COMPRESSED_FILE = "model.mosaic.safetensors"
_MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


@torch.no_grad()
def compact_model(model: nn.Module, structure: dict[str, list[int]], adapter: ModelAdapter | None = None) -> None:
    """Remove the units listed in ``structure`` (``{"3.mlp": [channels], "3.heads": [heads]}``) in place."""
    adapter = adapter or ModelAdapter(model)
    shapes = shapes_after(layer_shapes(adapter), structure)
    remove_units(adapter, structure)
    record_layer_shapes(model.config, shapes)


@torch.no_grad()
def remove_units(adapter: ModelAdapter, structure: dict[str, list[int]]) -> None:
    """Shrink the modules of the units in ``structure``, leaving the config as it is: a streamed run compacts each
    block as it is written and records every layer's sizes once, at the end (:func:`record_layer_shapes`)."""
    kinds = sorted({key.split(".")[1] for key in structure})
    groups = {g.key: g for g in unit_groups(adapter, kinds)} if kinds else {}
    unknown = set(structure) - set(groups)
    if unknown:
        raise ValueError(f"structure names unit groups this model does not have: {sorted(unknown)}")
    for key, removed in structure.items():
        _remove_units(adapter, groups[key], removed)
    for layer in sorted({groups[key].layer for key in structure}):
        adapter.rediscover(layer)


def layer_shapes(adapter: ModelAdapter) -> list[dict[str, int]]:
    """Every layer's unit counts as the model is now (``{"heads": 8, "mlp": 1536}``)."""
    return [dict(_current_shape(adapter, layer)) for layer in range(adapter.num_layers)]


def shapes_after(shapes: list[dict[str, int]], structure: dict[str, list[int]]) -> list[dict[str, int]]:
    """``shapes`` with the units of ``structure`` removed."""
    result = [dict(shape) for shape in shapes]
    for key, removed in structure.items():
        layer, kind = key.split(".")
        result[int(layer)][kind] -= len(removed)
    return result


def _current_shape(adapter: ModelAdapter, layer: int) -> dict[str, int]:
    heads, _, head_dim = attention_shape(adapter.model.config)
    shape = {HEADS: heads}
    down = next((p for p in adapter.every_projection(layer) if p.name == "down"), None)
    if down is not None:
        shape[MLP] = down.in_features
    return shape


def _remove_units(adapter: ModelAdapter, group: UnitGroup, removed: list[int]) -> None:
    kept_units = [u for u in range(group.count) if u not in set(removed)]
    if not kept_units:
        raise ValueError(f"{group.key}: cannot remove every unit")
    kept = torch.tensor([u * group.size + i for u in kept_units for i in range(group.size)], dtype=torch.long)
    projs = {p.name: p for p in adapter.every_projection(group.layer)}
    by_module: dict[int, list[tuple[Projection, str]]] = {}
    for name in group.rows:
        by_module.setdefault(id(projs[name].module), []).append((projs[name], "rows"))
    for name in group.cols:
        by_module.setdefault(id(projs[name].module), []).append((projs[name], "cols"))
    for entries in by_module.values():
        _shrink_module(adapter, entries, kept)
    if group.kind == HEADS:
        _set_head_count(adapter, projs["o"], len(kept_units))


def _shrink_module(adapter: ModelAdapter, entries: list[tuple[Projection, str]], kept: torch.Tensor) -> None:
    """Replace one module by a smaller copy keeping ``kept`` rows (per fused part) or columns."""
    proj = entries[0][0]
    module = proj.module
    out_features = module.weight.shape[1] if proj.transposed else module.weight.shape[0]
    in_features = module.weight.shape[0] if proj.transposed else module.weight.shape[1]
    rows = torch.arange(out_features)
    cols = torch.arange(in_features)
    for part, axis in entries:
        if axis == "cols":
            cols = kept
        else:
            start = part.rows.start if part.rows is not None else 0
            stop = part.rows.stop if part.rows is not None else out_features
            rows = torch.cat([rows[rows < start], start + kept, rows[rows >= stop]])
    weight = module.weight.data
    weight = weight.t() if proj.transposed else weight
    new_weight = weight[rows][:, cols]
    bias = getattr(module, "bias", None)
    if proj.transposed:
        replacement = type(module)(len(rows), len(cols))
        replacement.weight = nn.Parameter(new_weight.t().contiguous())
    else:
        replacement = nn.Linear(len(cols), len(rows), bias=bias is not None, dtype=weight.dtype, device=weight.device)
        replacement.weight = nn.Parameter(new_weight.contiguous())
    if bias is not None:
        replacement.bias = nn.Parameter(bias.data[rows].clone())
    parent_name, _, child = adapter.module_name(proj).rpartition(".")
    setattr(adapter.model.get_submodule(parent_name), child, replacement)


def _set_head_count(adapter: ModelAdapter, o_proj: Projection, kept_heads: int) -> None:
    heads, kv_heads, head_dim = attention_shape(adapter.model.config)
    attention = adapter.model.get_submodule(adapter.module_name(o_proj).rpartition(".")[0])
    if hasattr(attention, "num_key_value_groups"):  # multi-head attention loses its key/value heads too
        attention.num_key_value_groups = 1 if kv_heads == heads else kept_heads // kv_heads
    if hasattr(attention, "num_heads"):
        attention.num_heads = kept_heads
    if hasattr(attention, "split_size"):
        attention.split_size = kept_heads * head_dim


def record_layer_shapes(config, shapes: list[dict[str, int]]) -> None:
    """Record per-layer sizes in ``config``; update the standard fields when one size fits all layers and they can
    say it (then plain ``from_pretrained`` builds the compacted model)."""
    setattr(config, SHAPES_KEY, shapes)
    heads, kv_heads, head_dim = attention_shape(config)
    kept_heads = {s[HEADS] for s in shapes}
    kept_mlp = {s[MLP] for s in shapes if MLP in s}
    describable = len(kept_heads) == 1 and len(kept_mlp) <= 1
    if describable and kept_heads != {heads}:
        describable = states_heads(config, next(iter(kept_heads)))
    if not describable:
        return
    if kept_heads != {heads}:
        config.head_dim = head_dim
        config.num_attention_heads = kept_heads.pop()
        if kv_heads == heads:  # without grouped-query attention a head takes its key and value with it
            config.num_key_value_heads = config.num_attention_heads
    field = next((name for name in _MLP_FIELDS if hasattr(config, name)), None)
    if kept_mlp and field is not None:
        setattr(config, field, kept_mlp.pop())
    delattr(config, SHAPES_KEY)


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved by :func:`mosaic_lightning.save_pruned` (in ``dtype``, by default the dtype it was
    saved in, as ``from_pretrained`` does): per-layer shapes and compressed-tensors
    bitmask weights (decompressed here: transformers 5 does not), into a dense model whose config no longer
    claims compression, so saving it again writes a plain dense export.

    Only config JSON and safetensors are read: no pickle, no remote code. The model is built and compacted with
    its parameters on the ``meta`` device (accelerate's ``init_empty_weights``; buffers such as rotary
    frequencies are real) and the read tensors become its parameters (``load_state_dict(assign=True)``), so the
    weights are held once while loading, at their compacted size.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .compressed import decompress_state, sparsity_config

    path = pathlib.Path(path)
    if not path.is_dir():  # else transformers takes the path for a hub repo id and says that is malformed
        if path.exists():
            raise NotADirectoryError(f"load_pruned: {str(path)!r} is a file; give the directory save_pruned (or the "
                                     "command's --export_dir) wrote")  # fmt: skip
        raise FileNotFoundError(f"load_pruned: {str(path)!r}: no such directory ({path.absolute()}); give the "
                                "directory save_pruned (or the command's --export_dir) wrote")  # fmt: skip
    if (path / _OLD_COMPRESSED_FILE).exists():
        raise ValueError(f"{path} holds {_OLD_COMPRESSED_FILE}, a compressed format of development versions before "
                         "mosaic-lightning 0.1.0 that no release reads; prune the source model again with this "
                         "release to export it (--compress_export true for compressed storage)")  # fmt: skip
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    compressed = sparsity_config(config) is not None
    if compressed:
        del config.quantization_config
    shapes = getattr(config, SHAPES_KEY, None)
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # what save_pruned wrote
    dtype = dtype or (getattr(torch, saved) if isinstance(saved, str) else saved) or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
        if shapes is not None:
            compact_model(model, _structure_of(_checked_shapes(shapes, ModelAdapter(model), path), model))
    state = decompress_state(read_weights(path)) if compressed else read_weights(path)
    _check_fits_weights(model, state, path)
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")  # fmt: skip
    model.tie_weights()
    return model.eval()


def _structure_of(shapes: list[dict[str, int]], model: nn.Module) -> dict[str, list[int]]:
    """The units to remove from a full-size ``model`` so that layer ``l`` keeps ``shapes[l]`` (the last ones: kept
    units were stored first)."""
    adapter = ModelAdapter(model)
    structure = {}
    for layer, shape in enumerate(shapes):
        for kind, kept in shape.items():
            total = _current_shape(adapter, layer)[kind]
            if kept < total:
                structure[f"{layer}.{kind}"] = list(range(kept, total))
    return structure


def _checked_shapes(shapes, adapter: ModelAdapter, path: pathlib.Path) -> list[dict[str, int]]:
    """``mosaic_layer_shapes`` as the config states it, refused (naming the layer and field) unless it is one
    entry per layer of kept unit counts between 1 and the architecture's own: an edited or truncated config
    would otherwise end in a size mismatch deep in ``load_state_dict``, or a model that silently differs."""
    field = f"{path / 'config.json'}: {SHAPES_KEY}"
    if not isinstance(shapes, list) or len(shapes) != adapter.num_layers:
        size = len(shapes) if isinstance(shapes, list) else type(shapes).__name__
        raise ValueError(f"{field} has {size} entries; expected a list of one per layer ({adapter.num_layers})")
    heads, kv_heads, _ = attention_shape(adapter.model.config)
    for layer, shape in enumerate(shapes):
        full = _current_shape(adapter, layer)
        if not isinstance(shape, dict) or not set(shape) <= set(full):
            raise ValueError(f"{field}[{layer}] = {shape!r}; expected a mapping of {sorted(full)} to kept counts")
        for kind, kept in shape.items():
            step = kv_heads if kind == HEADS and kv_heads != heads else 1  # GQA: equal numbers per key/value head
            if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= full[kind] or kept % step:
                raise ValueError(f"{field}[{layer}].{kind} = {kept!r}; allowed values: integers in [1, {full[kind]}]"
                                 + (f" divisible by {step} (key/value heads)" if step > 1 else ""))  # fmt: skip
    return shapes


def _check_fits_weights(model: nn.Module, state: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    """Every stored tensor has the shape the config's sizes give it; a mismatch names the layer and field."""
    adapter = ModelAdapter(model)
    kinds = {p.param_name: (p.layer, MLP if p.name in ("gate", "up", "down") else HEADS)
             for p in adapter.all_projections()}  # fmt: skip
    for name, tensor in model.state_dict().items():
        stored = state.get(name)
        if stored is None or stored.shape == tensor.shape:
            continue
        layer, kind = kinds.get(name, (None, None))
        where = f"{SHAPES_KEY}[{layer}].{kind}" if kind else "the config's sizes"
        raise ValueError(f"{path}: {name} is {list(stored.shape)} in the weight files, but {where} in config.json "
                         f"gives {list(tensor.shape)}; the config does not describe these weights")  # fmt: skip


def read_weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """All safetensors shards of a directory, as stored."""
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(path / file))
    return state
