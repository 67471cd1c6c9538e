"""A FLUX .gguf in Black Forest Labs' naming (community files such as city96's) loads as diffusers' transformer.

The BFL files here are made from quantserve-written (diffusers-named) ones by the inverse of diffusers' conversion:
renamed, the split q/k/v (and MLP input) tensors fused back by concatenating their packed rows, the final modulation's
halves swapped back. Oracle: diffusers' own `convert_flux_transformer_checkpoint_to_diffusers` on the dequantized
BFL state dict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quantserve.runtime import load_model, load_pipeline, save_quantized
from quantserve.runtime.gguf_file import GGUFSource, write_gguf
from quantserve.runtime.model_files import CheckpointError
from tests.pipelines_fixtures import tiny_pipeline_dir

# BFL name (without .weight/.bias) -> the diffusers parts its rows hold, in order; "swap": rows (shift, scale)
_TOP = {
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "txt_in": ["context_embedder"],
    "img_in": ["x_embedder"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": "swap",
}
_DOUBLE = {
    "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
}
_DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                 "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
_SINGLE = {"modulation.lin": ["norm.linear"], "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
           "linear2": ["proj_out"]}
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def _image(pipe) -> np.ndarray:
    with torch.no_grad():
        return pipe(prompt="a red car on a road", num_inference_steps=2, height=32, width=32, output_type="np",
                    max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(0)).images


def _bfl_plan(n_double: int, n_single: int) -> dict[str, list[str] | str]:
    """BFL name -> diffusers names whose rows it concatenates ("swap" for the final modulation)."""
    plan: dict[str, list[str] | str] = {}
    for bfl, parts in _TOP.items():
        for p in ("weight", "bias"):
            plan[f"{bfl}.{p}"] = "swap" if parts == "swap" else [f"{d}.{p}" for d in parts]
    blocks = (("double_blocks", _DOUBLE, _DOUBLE_NORMS, "transformer_blocks", n_double),
              ("single_blocks", _SINGLE, _SINGLE_NORMS, "single_transformer_blocks", n_single))
    for kind, table, norms, target, n in blocks:
        for i in range(n):
            for bfl, parts in table.items():
                for p in ("weight", "bias"):
                    plan[f"{kind}.{i}.{bfl}.{p}"] = [f"{target}.{i}.{d}.{p}" for d in parts]
            for bfl, d in norms.items():
                plan[f"{kind}.{i}.{bfl}.scale"] = [f"{target}.{i}.{d}.weight"]
    return plan


def _bfl_tensors(diffusers_file: Path) -> dict[str, tuple]:
    """The BFL-named raw tensors (raw bytes, qtype, shape) of a diffusers-named FLUX .gguf, packed bytes untouched."""
    out: dict[str, tuple] = {}
    with GGUFSource(diffusers_file) as src:
        keys = set(src.keys())
        n_double = len({k.split(".")[1] for k in keys if k.startswith("transformer_blocks.")})
        n_single = len({k.split(".")[1] for k in keys if k.startswith("single_transformer_blocks.")})
        used: set[str] = set()
        for bfl, parts in _bfl_plan(n_double, n_single).items():
            if parts == "swap":
                name = "norm_out.linear." + bfl.rsplit(".", 1)[1]
                raw, qtype, shape = src.raw(name)
                half = raw.shape[0] // 2
                out[bfl] = (torch.cat([raw[half:], raw[:half]]).clone(), qtype, shape)
                used.add(name)
                continue
            raws = [src.raw(p) for p in parts]
            assert len({r[1] for r in raws}) == 1, (bfl, [r[1] for r in raws])
            shape = (sum(r[2][0] for r in raws), *raws[0][2][1:])
            out[bfl] = (torch.cat([r[0] for r in raws]).clone(), raws[0][1], shape)
            used.update(parts)
        assert used == keys, sorted(keys - used)
    return out


@pytest.fixture(scope="module", params=["gguf-q8_0", "gguf-q4_0"])
def files(request, tmp_path_factory) -> tuple[Path, Path, str]:
    """(diffusers-named .gguf, BFL-named .gguf made from it, scheme)."""
    tmp = tmp_path_factory.mktemp(request.param)
    pipe = load_pipeline(tiny_pipeline_dir("flux"), {"transformer": request.param}, torch_dtype=torch.float32)
    out = save_quantized(pipe, tmp / "flux")
    diffusers_file = next((out / "transformer").glob("*.gguf"))
    bfl_file = write_gguf(tmp / "flux-bfl.gguf", _bfl_tensors(diffusers_file), architecture="flux")
    return diffusers_file, bfl_file, request.param


def _dense_bfl(path: Path) -> dict[str, torch.Tensor]:
    """The BFL file dequantized by gguf-py alone (independent of quantserve's reader)."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        dense = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(dense, copy=True)).float().reshape(
            tuple(int(d) for d in reversed(t.shape.tolist())))
    return out


def test_presented_tensors_match_diffusers_own_conversion(files, monkeypatch):
    from diffusers.loaders import single_file_utils

    _, bfl_file, _ = files
    dense = _dense_bfl(bfl_file)
    inner = dense["img_in.weight"].shape[0]

    class _TinyTorch:  # diffusers' conversion hard-codes FLUX.1's inner dim (3072) for linear1's split
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def split(tensor, sizes, dim=0):
            if tuple(sizes) == (3072, 3072, 3072, 12288):
                sizes = (inner, inner, inner, tensor.shape[0] - 3 * inner)
            return torch.split(tensor, sizes, dim)

    monkeypatch.setattr(single_file_utils, "torch", _TinyTorch())
    theirs = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(dense))

    with GGUFSource(bfl_file) as src:
        ours = {k: src.get(k).float() for k in src.keys()}
        assert set(ours) == set(theirs)
        for k in theirs:
            assert src.shape(k) == tuple(theirs[k].shape), k
            assert torch.equal(ours[k], theirs[k]), k
        # the split Linear weights stay packed: raw rows of the fused tensor, no dequantizing
        raw, qtype, shape = src.raw("transformer_blocks.0.attn.to_k.weight")
        assert qtype in ("Q8_0", "Q4_0") and shape == (inner, inner)
        assert src.is_quantized("single_transformer_blocks.0.proj_mlp.weight")


def test_a_bfl_file_draws_the_same_image_as_the_diffusers_named_one(files):
    diffusers_file, bfl_file, _ = files
    tiny = tiny_pipeline_dir("flux")
    theirs = load_pipeline(tiny, None, torch_dtype=torch.float32, transformer_gguf=diffusers_file)
    ours = load_pipeline(tiny, None, torch_dtype=torch.float32, transformer_gguf=bfl_file)
    assert ours.quantserve_report.components["transformer"].backend == "gguf"
    assert np.array_equal(_image(theirs), _image(ours))


def _variant(files, tmp_path, name: str, edit) -> Path:
    diffusers_file = files[0]
    tensors = _bfl_tensors(diffusers_file)
    edit(tensors)
    return write_gguf(tmp_path / name, tensors, architecture="flux")


def test_missing_or_unknown_bfl_tensors_are_named(files, tmp_path):
    tiny = tiny_pipeline_dir("flux")
    missing = _variant(files, tmp_path, "missing.gguf", lambda t: t.pop("single_blocks.0.linear1.bias"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors: \['single_blocks\.0\.linear1\.bias'\]"):
        load_model(missing, config=tiny / "transformer", torch_dtype=torch.float32)
    # load_pipeline wraps it in a ComponentError (a ValueError) that names the component too
    with pytest.raises(ValueError, match=r"component 'transformer'.*single_blocks\.0\.linear1\.bias"):
        load_pipeline(tiny, None, torch_dtype=torch.float32, transformer_gguf=missing)

    def add_unknown(t):
        t["double_blocks.0.img_attn.lora_up.weight"] = (torch.zeros(4, 8), "F32")

    extra = _variant(files, tmp_path, "extra.gguf", add_unknown)
    with pytest.raises(CheckpointError, match=r"double_blocks\.0\.img_attn\.lora_up\.weight"):
        GGUFSource(extra)

    def add_block(t):  # a second single block: the tiny config.json says num_single_layers=1
        for k in [k for k in t if k.startswith("single_blocks.0.")]:
            t[k.replace("single_blocks.0.", "single_blocks.1.")] = t[k]

    more = _variant(files, tmp_path, "more.gguf", add_block)
    with pytest.raises(CheckpointError, match=r"2 single_blocks.*num_single_layers=1"):
        load_model(more, config=tiny / "transformer", torch_dtype=torch.float32)


def test_a_fused_tensor_that_does_not_split_exactly_says_so(files, tmp_path):
    def odd_qkv(t):
        raw, qtype, shape = t["double_blocks.0.img_attn.qkv.bias"]
        t["double_blocks.0.img_attn.qkv.bias"] = (torch.zeros(shape[0] - 1), "F32")

    bad = _variant(files, tmp_path, "odd.gguf", odd_qkv)
    with pytest.raises(CheckpointError, match=r"double_blocks\.0\.img_attn\.qkv\.bias.*cannot be split exactly"):
        GGUFSource(bad)


def test_the_model_diffusion_model_prefix_is_accepted(files, tmp_path):
    _, bfl_file, _ = files
    prefixed = _variant(files, tmp_path, "prefixed.gguf",
                        lambda t: t.update({f"model.diffusion_model.{k}": t.pop(k) for k in list(t)}))
    with GGUFSource(bfl_file) as plain, GGUFSource(prefixed) as src:
        assert sorted(src.keys()) == sorted(plain.keys())
        for k in plain.keys():
            assert torch.equal(src.raw(k)[0], plain.raw(k)[0]), k
