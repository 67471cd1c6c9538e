"""Real, small diffusers text-to-image pipelines written to disk offline, with seeded random weights.

`build_pipeline("flux", out_dir)` writes a directory that diffusers' own `DiffusionPipeline.from_pretrained` loads
with no hub access: every model is the real diffusers/transformers class at a small width, every tokenizer is
trained here on a built-in caption corpus, every weight is drawn from a per-tensor seeded generator. Two builds with
the same seed write byte-identical files; a float32 and a bfloat16 build of one seed hold the same values, rounded.

Presets: "tiny" (every family; about 2 MB, builds in a fraction of a second once diffusers is imported, for tests)
and "flux-real-width" (FLUX.1-dev's widths with one block of each kind, ~1 B parameters, for benchmarks of the real
layer shapes; ~20 s and under 2 GB of memory to build in bfloat16).

Writes are atomic (a temporary directory beside OUT_DIR, then a rename). Bad arguments raise ValueError naming the
argument and the accepted values; a non-empty OUT_DIR raises FileExistsError unless overwrite=True.

Command line: python -m quantserve.testing.pipelines FAMILY OUT_DIR [--preset tiny] [--seed 0] [--dtype float32]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import string
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

FAMILIES: tuple[str, ...] = ("flux", "sd3", "pixart-sigma", "sana")
PRESETS: tuple[str, ...] = ("tiny", "flux-real-width")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BIAS_STD = 0.02  # biases (and other vectors that are not a norm's) are drawn from N(0, BIAS_STD**2)
CLIP_MAX_LENGTH = 77  # CLIP's position embeddings; the pipelines pad CLIP prompts to tokenizer.model_max_length
T5_MAX_LENGTH = 512  # FLUX pads T5 prompts to 512, SD3 to 256, PixArt to 300: T5's positions are relative
GEMMA_MAX_LENGTH = 8192  # Gemma 2's rotary positions; Sana's instruction + 300 prompt tokens fit far below
T5_EXTRA_IDS = 100  # the sentinel tokens every T5 tokenizer carries

# norms whose forward multiplies by (1 + weight): their neutral weight is zero, not one
_ZERO_CENTRED_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm"})


# --------------------------------------------------------------------------------------------------------------
# The caption corpus and the tokenizers trained on it


_STYLES = ("a photo of", "a painting of", "an illustration of", "a watercolor of", "a 3d render of",
           "a pencil sketch of", "a close-up photograph of", "a digital artwork of", "an oil painting of",
           "a poster of", "a cinematic still of", "a drawing of")
_ADJECTIVES = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "small", "large", "tiny",
               "huge", "old", "young", "bright", "dark", "golden", "silver", "fluffy", "shiny", "wooden", "glass",
               "quiet", "busy", "snowy", "rainy", "sunny", "foggy", "ancient", "modern", "happy", "sleepy",
               "curious", "brave", "colorful", "rusty", "frozen", "glowing", "tall", "round")
_SUBJECTS = ("cat", "dog", "fox", "horse", "rabbit", "robot", "castle", "tree", "car", "bird", "flower",
             "mountain", "river", "lighthouse", "astronaut", "teapot", "bicycle", "owl", "dragon", "ship", "squirrel",
             "burger", "house", "bridge", "train", "penguin", "elephant", "violin", "cactus", "butterfly", "whale",
             "knight", "wizard", "panda", "tiger", "windmill", "balloon", "clock", "cup of coffee", "city street")
_ACTIONS = ("sitting on", "running through", "flying over", "standing near", "sleeping under", "walking across",
            "floating above", "hiding behind", "eating a burger in", "reading a book in", "dancing in",
            "looking at", "resting beside", "jumping over")
_PLACES = ("a forest", "the beach", "a snowy field", "a busy market", "the moon", "a quiet lake", "an old library",
           "a garden", "the desert", "a city at night", "a mountain village", "the ocean", "a kitchen table",
           "a wheat field", "a rainy street", "outer space", "a cozy room", "the jungle", "a frozen pond", "a meadow")
_DETAILS = ("soft light", "golden hour", "studio lighting", "highly detailed", "sharp focus", "4k", "8k",
            "cinematic lighting", "pastel colors", "high contrast", "shallow depth of field", "wide angle",
            "trending on artstation", "minimalist", "vintage film", "dramatic shadows")


@lru_cache(maxsize=1)
def caption_corpus() -> tuple[str, ...]:
    """The built-in training corpus: 480 short captions walked deterministically through word lists, then numbers."""
    captions = []
    for i in range(480):
        caption = (f"{_STYLES[i % len(_STYLES)]} a {_ADJECTIVES[(7 * i) % len(_ADJECTIVES)]} "
                   f"{_SUBJECTS[(11 * i + i // 40) % len(_SUBJECTS)]} {_ACTIONS[(5 * i) % len(_ACTIONS)]} "
                   f"{_PLACES[(3 * i + i // 20) % len(_PLACES)]}, {_DETAILS[(13 * i) % len(_DETAILS)]}")
        captions.append(caption.capitalize() + "." if i % 3 == 0 else caption)
    # every printable character once, so no tokenizer meets an unseen ASCII character in a prompt
    captions.append(" ".join(c for c in string.printable if not c.isspace()))
    captions.extend(f"{n} {n * 7} {n * 31}" for n in range(1, 40))
    return tuple(captions)


def train_bpe(word_counts: dict[tuple[str, ...], int], max_merges: int, min_count: int = 2) -> list[tuple[str, str]]:
    """Byte-pair merges learned from words (as symbol tuples) and their counts; ties go to the smaller pair.

    Written here rather than taken from `tokenizers`' trainer, whose tie-breaking follows hash-map order and so
    differs from run to run: these merges are the same in every process.
    """
    words = dict(word_counts)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_count:
            break
        merges.append(best)
        words = {_merge_pair(symbols, best): count for symbols, count in words.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _vocab_with_merges(base: list[str], merges: list[tuple[str, str]], tail: list[str]) -> dict[str, int]:
    tokens = list(dict.fromkeys(base + [a + b for a, b in merges] + tail))
    return {token: i for i, token in enumerate(tokens)}


@lru_cache(maxsize=1)
def _trained_clip() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    # split the corpus exactly as transformers' CLIPTokenizer will: NFC, lower case, CLIP's regex, byte-level
    backend = CLIPTokenizer().backend_tokenizer
    counts: dict[tuple[str, ...], int] = {}
    for caption in caption_corpus():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption)):
            symbols = (*word[:-1], word[-1] + "</w>")
            counts[symbols] = counts.get(symbols, 0) + 1
    merges = train_bpe(counts, max_merges=1000)
    # as CLIP's own vocabulary: the 256 byte symbols, each again as a word end, the merges, then the two specials
    alphabet = sorted(ByteLevel.alphabet())
    vocab = _vocab_with_merges(alphabet + [a + "</w>" for a in alphabet], merges,
                               ["<|startoftext|>", "<|endoftext|>"])
    return tuple(vocab.items()), tuple(merges)


@lru_cache(maxsize=1)
def _trained_t5() -> tuple[tuple[str, float], ...]:
    import io

    import sentencepiece

    # SentencePiece's Unigram, as T5's own tokenizer was trained; one thread, so the result is the same every time
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus()), model_writer=model, model_type="unigram", vocab_size=1000,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="identity",
        character_coverage=1.0, num_threads=1, minloglevel=2)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    # T5's layout: <pad> 0, </s> 1, <unk> 2, then the pieces (the sentinels come after, as added tokens)
    return tuple((processor.id_to_piece(i), float(processor.get_score(i))) for i in range(processor.get_piece_size()))


@lru_cache(maxsize=1)
def _trained_gemma() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    import re

    from transformers import GemmaTokenizerFast

    # Gemma turns spaces into "▁" and applies its merges to the whole text; merges are learned within words
    normalizer = GemmaTokenizerFast().backend_tokenizer.normalizer
    counts: dict[tuple[str, ...], int] = {}
    for caption in caption_corpus():
        for word in re.split(r"(?=▁)", normalizer.normalize_str(caption)):
            if word:
                counts[tuple(word)] = counts.get(tuple(word), 0) + 1
    merges = train_bpe(counts, max_merges=1000)
    # as Gemma's own vocabulary: specials, the 256 byte-fallback tokens, the characters, then the merges
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    characters = sorted({symbol for word in counts for symbol in word})
    vocab = _vocab_with_merges(specials + characters, merges, [])
    return tuple(vocab.items()), tuple(merges)


def clip_tokenizer() -> Any:
    """A CLIP tokenizer (byte-level BPE, `<|startoftext|>`/`<|endoftext|>`, 77 tokens) trained on the corpus."""
    from transformers import CLIPTokenizer

    vocab, merges = _trained_clip()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> Any:
    """A T5 tokenizer (Unigram, `<pad>`/`</s>`/`<unk>` and 100 sentinels, 512 tokens) trained on the corpus."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=list(_trained_t5()), extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)


def gemma_tokenizer() -> Any:
    """A Gemma tokenizer (BPE with byte fallback, `<bos>`/`<eos>`/`<pad>`/`<unk>`) trained on the corpus."""
    from transformers import GemmaTokenizerFast

    vocab, merges = _trained_gemma()
    return GemmaTokenizerFast(vocab=dict(vocab), merges=list(merges), add_bos_token=True, add_eos_token=False,
                              model_max_length=GEMMA_MAX_LENGTH)


_TOKENIZERS: dict[str, Callable[[], Any]] = {"clip": clip_tokenizer, "t5": t5_tokenizer, "gemma": gemma_tokenizer}


@lru_cache(maxsize=None)
def _vocab_size(kind: str) -> int:
    return len(_TOKENIZERS[kind]())  # what the text encoder's embedding must cover, sentinels included


# --------------------------------------------------------------------------------------------------------------
# Component specs: what a pipeline is made of, as data


@dataclass(frozen=True)
class ModelSpec:
    """A model component: its library, class, and the keyword config it is built from (no weights)."""

    library: str  # "diffusers" or "transformers"
    class_name: str
    config: dict[str, Any]
    config_class: str | None = None  # transformers models take a config object of this class

    def build_empty(self) -> torch.nn.Module:
        """The model with its parameters on the meta device and its buffers computed for real."""
        from accelerate import init_empty_weights

        cls = getattr(importlib.import_module(self.library), self.class_name)
        # constructors draw from the global generator (e.g. randn tables before they move to meta): leave it alone
        with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
            if self.config_class is None:
                return cls(**self.config)
            config_cls = getattr(importlib.import_module(self.library), self.config_class)
            model = cls(config_cls(**self.config))
        # T5's encoder embedding is its shared one; tying under init_empty_weights would register a fresh copy
        model.tie_weights()
        return model


@dataclass(frozen=True)
class SchedulerSpec:
    """A scheduler component: its diffusers class and config."""

    class_name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineSpec:
    """A whole pipeline: the diffusers pipeline class and its components, in the order they are written."""

    pipeline_class: str
    models: dict[str, ModelSpec]
    tokenizers: dict[str, str]  # component name -> "clip" | "t5" | "gemma"
    scheduler: SchedulerSpec

    def component_names(self) -> list[str]:
        """Every component, the cheap ones first."""
        return [*self.tokenizers, "scheduler", *self.models]


def _clip_config(*, hidden: int, intermediate: int, heads: int, layers: int, projection: int,
                 act: str = "quick_gelu") -> dict[str, Any]:
    vocab = dict(_trained_clip()[0])
    return {"vocab_size": _vocab_size("clip"), "hidden_size": hidden, "intermediate_size": intermediate,
            "projection_dim": projection, "num_hidden_layers": layers, "num_attention_heads": heads,
            "max_position_embeddings": CLIP_MAX_LENGTH, "hidden_act": act, "layer_norm_eps": 1e-5,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"]}


def _t5_config(*, d_model: int, d_ff: int, heads: int, d_kv: int, layers: int) -> dict[str, Any]:
    # T5 v1.1 (what FLUX, SD3 and PixArt use): gated-GELU feed-forward, relative position buckets
    return {"vocab_size": _vocab_size("t5"), "d_model": d_model, "d_ff": d_ff, "num_heads": heads, "d_kv": d_kv,
            "num_layers": layers, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0,
            "is_encoder_decoder": False, "use_cache": False,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def _gemma2_config(*, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                   layers: int) -> dict[str, Any]:
    vocab = dict(_trained_gemma()[0])
    return {"vocab_size": _vocab_size("gemma"), "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "query_pre_attn_scalar": head_dim, "max_position_embeddings": GEMMA_MAX_LENGTH,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "sliding_window": 4096,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "pad_token_id": vocab["<pad>"], "eos_token_id": vocab["<eos>"], "bos_token_id": vocab["<bos>"]}


def _vae_kl_config(*, channels: Sequence[int], latent: int, groups: int, layers_per_block: int, sample_size: int,
                   scaling: float, shift: float | None, quant_conv: bool) -> dict[str, Any]:
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels), "block_out_channels": list(channels),
            "layers_per_block": layers_per_block, "act_fn": "silu", "latent_channels": latent,
            "norm_num_groups": groups, "sample_size": sample_size, "scaling_factor": scaling,
            "shift_factor": shift, "force_upcast": True, "use_quant_conv": quant_conv,
            "use_post_quant_conv": quant_conv, "mid_block_add_attention": True}


# four stages (a VAE scale factor of 8, as every real AutoencoderKL) of very few channels
_TINY_VAE = {"channels": (8, 8, 16, 16), "latent": 4, "groups": 4, "layers_per_block": 1, "sample_size": 256}
_TINY_T5 = {"d_model": 64, "d_ff": 128, "heads": 4, "d_kv": 16, "layers": 2}


def _flux_scheduler() -> SchedulerSpec:
    # FLUX.1-dev's: the shift grows with the image's token count
    return SchedulerSpec("FlowMatchEulerDiscreteScheduler", {
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
        "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096})


def _flux_spec(transformer: dict[str, Any], clip: dict[str, Any], t5: dict[str, Any],
               vae: dict[str, Any]) -> PipelineSpec:
    return PipelineSpec(
        pipeline_class="FluxPipeline",
        models={"text_encoder": ModelSpec("transformers", "CLIPTextModel", clip, "CLIPTextConfig"),
                "text_encoder_2": ModelSpec("transformers", "T5EncoderModel", t5, "T5Config"),
                "vae": ModelSpec("diffusers", "AutoencoderKL", vae),
                "transformer": ModelSpec("diffusers", "FluxTransformer2DModel", transformer)},
        tokenizers={"tokenizer": "clip", "tokenizer_2": "t5"},
        scheduler=_flux_scheduler(),
    )


def _flux_tiny() -> PipelineSpec:
    t5 = _t5_config(**_TINY_T5)
    clip = _clip_config(hidden=32, intermediate=64, heads=2, layers=2, projection=32)
    vae = _vae_kl_config(**_TINY_VAE, scaling=0.3611, shift=0.1159, quant_conv=False)
    transformer = {"patch_size": 1, "in_channels": 4 * vae["latent_channels"], "num_layers": 1, "num_single_layers": 1,
                   "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": t5["d_model"],
                   "pooled_projection_dim": clip["hidden_size"], "guidance_embeds": True,
                   "axes_dims_rope": [8, 12, 12]}
    return _flux_spec(transformer, clip, t5, vae)


def _flux_real_width() -> PipelineSpec:
    # T5 v1.1 XXL and CLIP ViT-L/14's widths at two layers each; FLUX.1-dev's VAE in full
    t5 = _t5_config(d_model=4096, d_ff=10240, heads=64, d_kv=64, layers=2)
    clip = _clip_config(hidden=768, intermediate=3072, heads=12, layers=2, projection=768)
    vae = _vae_kl_config(channels=(128, 256, 512, 512), latent=16, groups=32, layers_per_block=2, sample_size=1024,
                         scaling=0.3611, shift=0.1159, quant_conv=False)
    transformer = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
    return _flux_spec(transformer, clip, t5, vae)


def _sd3_tiny() -> PipelineSpec:
    t5 = _t5_config(**_TINY_T5)
    clip_l = _clip_config(hidden=32, intermediate=64, heads=2, layers=2, projection=32)
    clip_g = _clip_config(hidden=32, intermediate=64, heads=2, layers=3, projection=32, act="gelu")
    vae = _vae_kl_config(**_TINY_VAE, scaling=1.5305, shift=0.0609, quant_conv=False)
    # SD3 concatenates both CLIPs' hidden states and pads them to T5's width: T5 (64) must be as wide as 32 + 32
    transformer = {"sample_size": 16, "patch_size": 2, "in_channels": vae["latent_channels"], "num_layers": 2,
                   "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": t5["d_model"],
                   "caption_projection_dim": 64,
                   "pooled_projection_dim": clip_l["projection_dim"] + clip_g["projection_dim"],
                   "out_channels": vae["latent_channels"], "pos_embed_max_size": 16}
    return PipelineSpec(
        pipeline_class="StableDiffusion3Pipeline",
        models={"text_encoder": ModelSpec("transformers", "CLIPTextModelWithProjection", clip_l, "CLIPTextConfig"),
                "text_encoder_2": ModelSpec("transformers", "CLIPTextModelWithProjection", clip_g, "CLIPTextConfig"),
                "text_encoder_3": ModelSpec("transformers", "T5EncoderModel", t5, "T5Config"),
                "vae": ModelSpec("diffusers", "AutoencoderKL", vae),
                "transformer": ModelSpec("diffusers", "SD3Transformer2DModel", transformer)},
        tokenizers={"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "t5"},
        scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
    )


def _pixart_sigma_tiny() -> PipelineSpec:
    t5 = _t5_config(**_TINY_T5)
    vae = _vae_kl_config(**_TINY_VAE, scaling=0.13025, shift=None, quant_conv=True)
    # sample_size 32 is one the pipeline's resolution binning knows (its 256 px table), so the defaults work
    transformer = {"sample_size": 32, "num_layers": 2, "patch_size": 2, "attention_head_dim": 32,
                   "num_attention_heads": 2, "caption_channels": t5["d_model"], "in_channels": vae["latent_channels"],
                   "out_channels": 2 * vae["latent_channels"], "cross_attention_dim": 64, "attention_bias": True,
                   "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
                   "norm_elementwise_affine": False, "norm_eps": 1e-6}
    return PipelineSpec(
        pipeline_class="PixArtSigmaPipeline",
        models={"text_encoder": ModelSpec("transformers", "T5EncoderModel", t5, "T5Config"),
                "vae": ModelSpec("diffusers", "AutoencoderKL", vae),
                "transformer": ModelSpec("diffusers", "PixArtTransformer2DModel", transformer)},
        tokenizers={"tokenizer": "t5"},
        # PixArt-Sigma's own: DPM-Solver++ over the linear-beta DDPM schedule it was trained with
        scheduler=SchedulerSpec("DPMSolverMultistepScheduler", {
            "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": "epsilon", "solver_order": 2, "algorithm_type": "dpmsolver++",
            "lower_order_final": True}),
    )


def _sana_tiny() -> PipelineSpec:
    gemma = _gemma2_config(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, layers=2)
    # DC-AE's six stages (a VAE scale factor of 32, as Sana's own), of very few channels
    vae = {"in_channels": 3, "latent_channels": 4, "attention_head_dim": 8,
           "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
           "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
           "encoder_block_out_channels": [8, 8, 16, 16, 32, 32], "decoder_block_out_channels": [8, 8, 16, 16, 32, 32],
           "encoder_layers_per_block": [1] * 6, "decoder_layers_per_block": [1] * 6,
           "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
           "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
           "upsample_block_type": "interpolate", "downsample_block_type": "Conv",
           "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * 3,
           "decoder_act_fns": ["relu"] * 3 + ["silu"] * 3, "scaling_factor": 0.41407}
    transformer = {"in_channels": vae["latent_channels"], "out_channels": vae["latent_channels"],
                   "num_attention_heads": 2, "attention_head_dim": 32, "num_layers": 2,
                   "num_cross_attention_heads": 2, "cross_attention_head_dim": 32, "cross_attention_dim": 64,
                   "caption_channels": gemma["hidden_size"], "mlp_ratio": 2.5, "sample_size": 16, "patch_size": 1,
                   "norm_elementwise_affine": False, "norm_eps": 1e-6}
    return PipelineSpec(
        pipeline_class="SanaPipeline",
        models={"text_encoder": ModelSpec("transformers", "Gemma2Model", gemma, "Gemma2Config"),
                "vae": ModelSpec("diffusers", "AutoencoderDC", vae),
                "transformer": ModelSpec("diffusers", "SanaTransformer2DModel", transformer)},
        tokenizers={"tokenizer": "gemma"},
        scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
    )


_SPECS: dict[str, dict[str, Callable[[], PipelineSpec]]] = {
    "flux": {"tiny": _flux_tiny, "flux-real-width": _flux_real_width},
    "sd3": {"tiny": _sd3_tiny},
    "pixart-sigma": {"tiny": _pixart_sigma_tiny},
    "sana": {"tiny": _sana_tiny},
}


def _spec_factory(family: str, preset: str) -> Callable[[], PipelineSpec]:
    if family not in _SPECS:
        raise ValueError(f"family {family!r} is unknown; accepted values: {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is unknown; accepted values: {', '.join(PRESETS)}")
    if preset not in _SPECS[family]:
        raise ValueError(f"preset {preset!r} is not available for family {family!r}; accepted values for "
                         f"{family!r}: {', '.join(_SPECS[family])}")
    return _SPECS[family][preset]


def pipeline_spec(family: str, preset: str = "tiny") -> PipelineSpec:
    """The spec (pipeline class, component classes and configs) of one family at one preset; no weights."""
    return _spec_factory(family, preset)()


def flux_real_width_configs() -> dict[str, dict[str, Any]]:
    """The model configs of the flux-real-width preset (transformer, text encoders, VAE), without any weights."""
    return {name: dict(spec.config) for name, spec in _flux_real_width().models.items()}


# --------------------------------------------------------------------------------------------------------------
# Weights


def _tensor_seed(seed: int, component: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _initial_value(owner: torch.nn.Module, param_name: str, shape: torch.Size, dtype: torch.dtype,
                   seed: int) -> torch.Tensor:
    kind = type(owner).__name__
    if "Norm" in kind:  # LayerNorm, GroupNorm, RMSNorm, T5LayerNorm, BatchNorm2d, ...: start neutral
        neutral = 0.0 if param_name == "bias" or kind in _ZERO_CENTRED_NORMS else 1.0
        return torch.full(shape, neutral, dtype=dtype)
    # matrices, convolutions and embeddings keep activations near unit scale at any width (1/sqrt(fan-in), which
    # is ~0.02 at FLUX's 3072); biases and other vectors are small
    fan_in = shape.numel() // shape[0] if len(shape) >= 2 else 0
    std = fan_in**-0.5 if fan_in else BIAS_STD
    generator = torch.Generator().manual_seed(seed)
    # drawn in float32 and rounded, so that every dtype of one seed holds the same values
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)


def materialise(model: torch.nn.Module, *, seed: int, dtype: torch.dtype, component: str) -> torch.nn.Module:
    """Give every meta parameter of `model` seeded values in `dtype`, one tensor at a time; tied ones stay tied."""
    done: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for param_name, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in done:
                    full_name = f"{module_name}.{param_name}" if module_name else param_name
                    value = _initial_value(module, param_name, param.shape, dtype,
                                           _tensor_seed(seed, component, full_name))
                    done[id(param)] = torch.nn.Parameter(value, requires_grad=False)
                module._parameters[param_name] = done[id(param)]
        for module in model.modules():  # floating buffers too (SD3 stores its position table), as .to(dtype) would
            for buffer_name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    module._buffers[buffer_name] = buffer.to(dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Writing


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype {dtype!r} is not supported; accepted values: {', '.join(DTYPES)}")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh directory beside `out_dir` that replaces it on success (quantserve's one atomic writer), refusing
    to replace a non-empty `out_dir` that appeared meanwhile unless `overwrite`."""
    from quantserve.kernels.atomic_write import atomic_directory

    with atomic_directory(out_dir) as tmp:
        yield tmp
        if not overwrite and out_dir.exists() and not _is_empty_dir(out_dir):
            raise FileExistsError(f"out_dir {str(out_dir)!r} appeared while building; pass overwrite=True")


@contextmanager
def _quiet_saving() -> Iterator[None]:
    """Silence transformers' per-shard progress bar while a component saves (ours counts components)."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if was_enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _write_components(spec: PipelineSpec, directory: Path, *, seed: int, dtype: torch.dtype, progress: bool,
                      label: str) -> None:
    from tqdm.auto import tqdm

    from quantserve.runtime.memory import release_freed_memory

    components: dict[str, Any] = {}
    names = spec.component_names()
    for name in tqdm(names, desc=label, unit="component", disable=not progress):
        if name in spec.tokenizers:
            component = _TOKENIZERS[spec.tokenizers[name]]()
        elif name == "scheduler":
            scheduler_cls = getattr(importlib.import_module("diffusers"), spec.scheduler.class_name)
            component = scheduler_cls(**spec.scheduler.config)
        else:
            component = materialise(spec.models[name].build_empty(), seed=seed, dtype=dtype, component=name)
        with _quiet_saving():
            component.save_pretrained(directory / name)
        if isinstance(component, torch.nn.Module):
            component.to("meta")  # free the weights now: only the class and config are needed below
            release_freed_memory()
        components[name] = component
    # the pipeline object itself writes model_index.json, in the form diffusers' save_pretrained gives it
    pipeline_cls = getattr(importlib.import_module("diffusers"), spec.pipeline_class)
    pipeline_cls(**components).save_config(directory)


def build_pipeline(family: str, out_dir: str | os.PathLike[str], *, preset: str = "tiny", seed: int = 0,
                   dtype: torch.dtype | str = torch.float32, overwrite: bool = False,
                   progress: bool = False) -> Path:
    """Write a loadable diffusers pipeline of `family` at `preset` with weights seeded by `seed`; return its path."""
    make_spec = _spec_factory(family, preset)
    dtype = _check_dtype(dtype)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed {seed!r} is not supported; accepted values: an integer")
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not overwrite and not _is_empty_dir(out):
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not empty; pass overwrite=True to replace it")
    with torch.no_grad(), _atomic_dir(out, overwrite) as tmp:
        _write_components(make_spec(), tmp, seed=seed, dtype=dtype, progress=progress, label=f"{family} ({preset})")
    return out


# --------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quantserve.testing.pipelines",
        description="Write a small, real diffusers text-to-image pipeline with seeded random weights to OUT_DIR, "
                    "offline (tokenizers are trained locally). DiffusionPipeline.from_pretrained(OUT_DIR) loads it.",
        epilog="presets: 'tiny' (every family, a few MB) and 'flux-real-width' (flux only: FLUX.1-dev's widths with "
               "one double and one single block, T5-XXL and CLIP-L widths at two layers, FLUX's VAE; ~1 B "
               "parameters: build it with --dtype bfloat16, ~2 GB on disk, ~20 s).",
    )
    parser.add_argument("family", choices=FAMILIES, metavar="FAMILY", help=f"pipeline family: {', '.join(FAMILIES)}")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                        help="directory to write (must be absent or empty unless --overwrite)")
    parser.add_argument("--preset", default="tiny", choices=PRESETS, help="sizes to build (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights "
                        "(default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: build one pipeline and print where it went."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        path = build_pipeline(args.family, args.out_dir, preset=args.preset, seed=args.seed, dtype=args.dtype,
                              overwrite=args.overwrite, progress=True)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))  # exits with status 2 and the usage line
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
