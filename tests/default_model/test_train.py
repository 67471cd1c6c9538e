"""The training script: runs on a tiny budget, writes a loadable diffusers model directory atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from safetensors import safe_open

from quantserve.default_model import default_model_dir, load_pipeline
from quantserve.default_model.model import NULL_CLASS, TRANSFORMER_CONFIG, build_transformer
from quantserve.default_model.train import disable_builtin_label_dropout, lr_at, main


def _dtypes(model_dir: Path) -> set[torch.dtype]:
    with safe_open(str(model_dir / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_tiny_training_run_writes_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "model"
    main(["--out", str(out), "--steps", "3", "--batch", "8", "--seed", "1", "--threads", "1"])
    assert _dtypes(out) == {torch.bfloat16}
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert index["_quantserve"]["null_class"] == NULL_CLASS
    assert index["_quantserve"]["training"]["steps"] == 3
    generic = DiTTransformer2DModel.from_pretrained(out, subfolder="transformer")
    assert generic.config.num_embeds_ada_norm == 10
    pipe = load_pipeline(out, dtype=torch.float32)
    result = pipe(["1", "two"], seed=0, num_inference_steps=3)
    assert len(result.images) == 2 and torch.isfinite(result.pixels).all()


def test_rewriting_a_model_dir_replaces_it_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    main(["--out", str(out), "--steps", "1", "--batch", "4", "--weights-dtype", "float32", "--threads", "1"])
    assert not (out / "stale.txt").exists()
    assert _dtypes(out) == {torch.float32}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert oct((out / "transformer").stat().st_mode & 0o755) == oct(0o755)


def test_shipped_model_matches_the_architecture_and_schedule() -> None:
    root = default_model_dir()
    config = json.loads((root / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in TRANSFORMER_CONFIG} == TRANSFORMER_CONFIG
    scheduler = DDIMScheduler.from_pretrained(root / "scheduler")
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert scheduler.config.prediction_type == "v_prediction"


def test_builtin_label_dropout_is_off_so_the_training_loop_alone_drops_to_the_null_class() -> None:
    model = build_transformer()
    disable_builtin_label_dropout(model)
    model.train()
    embedders = [m for m in model.modules() if isinstance(m, LabelEmbedding)]
    assert len(embedders) == TRANSFORMER_CONFIG["num_layers"]
    labels = torch.full((256,), 3)
    for emb in embedders:
        assert emb.embedding_table.num_embeddings == NULL_CLASS + 1
        assert torch.equal(emb(labels), emb.embedding_table(labels))


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    assert lr_at(0, 1000, 1.0) < lr_at(99, 1000, 1.0) == 1.0
    assert abs(lr_at(999, 1000, 1.0) - 0.1) < 1e-4
