"""Black Forest Labs FLUX tensor names (community .gguf files, e.g. city96's) -> diffusers' FluxTransformer2DModel.

The map follows diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (diffusers/loaders/single_file_utils.py):
renamed tensors, the fused attention projections split along their output rows (`double_blocks.N.{img,txt}_attn.qkv`
into q, k, v; `single_blocks.N.linear1` into q, k, v and the MLP input), and `final_layer.adaLN_modulation.1`, which
BFL orders (shift, scale), with its row halves swapped into diffusers' (scale, shift). Every presented tensor is a
`View`: a source tensor and the row ranges (along dimension 0) that make it, so GGUF blocks, which run along a row,
are sliced without dequantizing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model_files import CheckpointError

# a prefix some single-file checkpoints carry (diffusers strips it too)
BFL_PREFIX = "model.diffusion_model."
_BFL_TOP = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
            "final_layer.")

# BFL module -> diffusers module, outside the blocks (Linear layers: .weight and .bias)
_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) -> (scale, shift)
}
_GUIDANCE = ("guidance_in.in_layer", "guidance_in.out_layer")
_SWAPPED = "final_layer.adaLN_modulation.1"

# inside double_blocks.N -> transformer_blocks.N; a tuple: the rows split into those parts
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {  # RMSNorm `.scale` -> `.weight`
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
# inside single_blocks.N -> single_transformer_blocks.N
_SINGLE = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # rows: inner, inner, inner, the MLP's
    "linear2": "proj_out",
}
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}

_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")


@dataclass(frozen=True)
class View:
    """A presented tensor: `source` (the name in the file) restricted to `rows`, ranges along dimension 0 that are
    concatenated in order; None: the whole tensor. `shape` is the presented torch shape."""

    source: str
    rows: tuple[tuple[int, int], ...] | None
    shape: tuple[int, ...]


def is_bfl_flux(names: list[str], architecture: str | None) -> bool:
    """True for a file in BFL FLUX naming: a BFL top-level name, or `general.architecture` "flux" without any of
    diffusers' FLUX names."""
    stripped = [n.removeprefix(BFL_PREFIX) for n in names]
    if any(n.startswith(_BFL_TOP) for n in stripped):
        return True
    return architecture == "flux" and not any(n.startswith(("transformer_blocks.", "x_embedder.")) for n in stripped)


def _split_module(path: Path, name: str, rest: str, norms: bool) -> tuple[str, str]:
    module, _, param = rest.rpartition(".")
    if not module or param not in (("scale",) if norms else ("weight", "bias")):
        raise CheckpointError(f"{path}: tensor {name!r} is not a tensor of BFL FLUX naming that quantserve knows")
    return module, param


def bfl_flux_views(shapes: Mapping[str, tuple[int, ...]], path: Path,
                   config: Mapping[str, Any] | None = None) -> dict[str, View]:
    """diffusers name -> View for every tensor of a BFL-named FLUX file (`shapes`: file name -> torch shape).

    Block counts come from the names (and must match `config`'s num_layers / num_single_layers where given);
    unknown names, missing tensors and fused tensors whose rows do not split exactly are CheckpointErrors."""
    plain: dict[str, tuple[str, str]] = {}  # stripped name -> file name
    for name in shapes:
        stripped = name.removeprefix(BFL_PREFIX)
        if stripped in plain:
            raise CheckpointError(f"{path}: tensor {stripped!r} is stored twice (with and without {BFL_PREFIX!r})")
        plain[stripped] = name

    # group: (kind, index or None, module, param) -> file name
    entries: dict[tuple[str, int | None, str, str], str] = {}
    for stripped, name in plain.items():
        m = _BLOCK.fullmatch(stripped)
        if m:
            kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
            table, norm_table = (_DOUBLE, _DOUBLE_NORMS) if kind == "double_blocks" else (_SINGLE, _SINGLE_NORMS)
            module, param = _split_module(path, name, rest, rest.rpartition(".")[0] in norm_table)
            if module not in table and module not in norm_table:
                raise CheckpointError(f"{path}: tensor {name!r} is not a tensor of BFL FLUX naming that quantserve "
                                      "knows")
            entries[(kind, index, module, param)] = name
        else:
            module, param = _split_module(path, name, stripped, False)
            if module not in _TOP:
                raise CheckpointError(f"{path}: tensor {name!r} is not a tensor of BFL FLUX naming that quantserve "
                                      "knows")
            entries[("top", None, module, param)] = name

    counts = {}
    for kind in ("double_blocks", "single_blocks"):
        indices = sorted({i for (k, i, _, _) in entries if k == kind})
        counts[kind] = indices[-1] + 1 if indices else 0
    if config is not None:
        for kind, key in (("double_blocks", "num_layers"), ("single_blocks", "num_single_layers")):
            if key in config and int(config[key]) != counts[kind]:
                raise CheckpointError(f"{path}: holds {counts[kind]} {kind} (by its tensor names), but the "
                                      f"transformer's config.json says {key}={config[key]}")

    # every tensor the model needs, by its BFL name
    guidance = bool(config.get("guidance_embeds")) if config is not None and "guidance_embeds" in config else \
        any(m in _GUIDANCE for (k, _, m, _) in entries if k == "top")
    expected: list[tuple[str, int | None, str, str]] = []
    for module in _TOP:
        if module in _GUIDANCE and not guidance:
            continue
        expected += [("top", None, module, p) for p in ("weight", "bias")]
    for kind, table, norm_table in (("double_blocks", _DOUBLE, _DOUBLE_NORMS),
                                    ("single_blocks", _SINGLE, _SINGLE_NORMS)):
        for i in range(counts[kind]):
            expected += [(kind, i, m, p) for m in table for p in ("weight", "bias")]
            expected += [(kind, i, m, "scale") for m in norm_table]
    missing = [e for e in expected if e not in entries]
    if missing:
        names = [f"{k}.{i}.{m}.{p}" if i is not None else f"{m}.{p}" for k, i, m, p in missing]
        raise CheckpointError(f"{path}: a BFL FLUX file, but lacks {len(names)} tensors: {names[:8]}")
    extra = [entries[e] for e in entries if e not in set(expected)]
    if extra:  # guidance tensors in a file whose config has no guidance embedder
        raise CheckpointError(f"{path}: tensor {extra[0]!r} has no place in the transformer its config.json describes "
                              f"(guidance_embeds={guidance})")

    inner = shapes[entries[("top", None, "img_in", "weight")]][0]
    if config is not None and "num_attention_heads" in config and "attention_head_dim" in config:
        want = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        if want != inner:
            raise CheckpointError(f"{path}: img_in.weight has {inner} output rows, but the transformer's config.json "
                                  f"says num_attention_heads*attention_head_dim = {want}")

    views: dict[str, View] = {}
    for (kind, index, module, param), name in entries.items():
        shape = tuple(shapes[name])
        rows = shape[0] if shape else 0
        if kind == "top":
            target = _TOP[module]
            prefix = ""
        else:
            table, norm_table = (_DOUBLE, _DOUBLE_NORMS) if kind == "double_blocks" else (_SINGLE, _SINGLE_NORMS)
            target = norm_table.get(module) or table[module]
            prefix = f"{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{index}."
        out_param = "weight" if param == "scale" else param
        if isinstance(target, tuple):  # fused: split the rows
            if len(target) == 3:
                if rows % 3:
                    raise CheckpointError(f"{path}: tensor {name!r} of shape {list(shape)} cannot be split exactly "
                                          f"into q, k, v: {rows} rows are not a multiple of 3")
                sizes = [rows // 3] * 3
            else:
                if rows <= 3 * inner:
                    raise CheckpointError(f"{path}: tensor {name!r} of shape {list(shape)} cannot be split exactly "
                                          f"into q, k, v ({inner} rows each, from img_in.weight) and the MLP input: "
                                          f"it has {rows} rows")
                sizes = [inner] * 3 + [rows - 3 * inner]
            start = 0
            for part, size in zip(target, sizes):
                views[f"{prefix}{part}.{out_param}"] = View(name, ((start, start + size),), (size, *shape[1:]))
                start += size
        elif module == _SWAPPED:
            if rows % 2:
                raise CheckpointError(f"{path}: tensor {name!r} of shape {list(shape)} cannot be split exactly into "
                                      f"shift and scale halves: {rows} rows are odd")
            half = rows // 2
            views[f"{prefix}{target}.{out_param}"] = View(name, ((half, rows), (0, half)), shape)
        else:
            views[f"{prefix}{target}.{out_param}"] = View(name, None, shape)
    return views
