"""Evaluation: the judge, the Fréchet distance, pixel differences, PNG grids and the eval command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantserve.default_model.classifier import heldout_classifier, train_classifier
from quantserve.default_model.eval_cli import add_eval_command
from quantserve.default_model.evaluate import (
    frechet_distance,
    grid_name,
    main,
    parse_schemes,
    pixel_difference,
    run_eval,
    save_grid,
)
from quantserve.default_model.model import load_split


def test_judge_is_accurate_on_real_digits_it_never_saw() -> None:
    split = load_split()
    predictions = heldout_classifier().predict(torch.from_numpy(split.train_x).unsqueeze(1))
    accuracy = (predictions.numpy() == split.train_y).mean()
    assert accuracy >= 0.97, f"judge accuracy {accuracy:.3f} on the diffusion training split"


def test_judge_training_is_deterministic() -> None:
    split = load_split()
    a = train_classifier(split.heldout_x[:200], split.heldout_y[:200], epochs=3)
    b = train_classifier(split.heldout_x[:200], split.heldout_y[:200], epochs=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_frechet_distance_of_identical_sets_is_zero_and_of_shifted_sets_the_squared_shift() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shift = np.zeros(16)
    shift[:4] = 1.5
    assert frechet_distance(feats, feats + shift) == pytest.approx(4 * 1.5**2, rel=1e-6)


def test_pixel_difference_on_tensors_and_pil_images() -> None:
    a = torch.zeros(3, 1, 8, 8)
    assert pixel_difference(a, a) == 0.0
    assert pixel_difference(a, a + 0.5) == pytest.approx(0.5)
    ims = [Image.fromarray(np.full((8, 8), 255, np.uint8)), Image.fromarray(np.zeros((8, 8), np.uint8))]
    assert pixel_difference(ims, ims[::-1]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same shape"):
        pixel_difference(a, a[:2])


def test_save_grid_writes_a_png_of_the_documented_size(tmp_path: Path) -> None:
    pixels = torch.linspace(-1, 1, 20 * 64).reshape(20, 1, 8, 8)
    path = save_grid(pixels, tmp_path / "sub" / "grid.png", rows=10, scale=4, pad=2)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (2 * 32 + 3 * 2, 10 * 32 + 11 * 2)
        arr = np.asarray(im)
    assert arr[2, 2] == 0 and arr[-3, -3] == 255  # first image starts black, last one ends white
    with pytest.raises(ValueError, match="rows"):
        save_grid(pixels, tmp_path / "bad.png", rows=3)


def test_grid_names_are_safe_file_names() -> None:
    assert grid_name("bf16") == "digits_bf16.png"
    assert grid_name("torchao:int8/wo") == "digits_torchao_int8_wo.png"


def test_parse_schemes_puts_the_bf16_baseline_first() -> None:
    assert parse_schemes("nf4, int8") == ["bf16", "nf4", "int8"]
    assert parse_schemes("int8,bf16,int8") == ["bf16", "int8"]
    with pytest.raises(ValueError, match="--schemes"):
        parse_schemes(" , ")


def test_eval_command_json_for_bf16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--schemes", "bf16", "--n", "5", "--json", "--out", str(tmp_path), "--grid-cols", "3"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"] == {"n_per_digit": 5, "seed": 0, "steps": 25, "guidance_scale": 1.0}
    bf16 = report["results"]["bf16"]
    assert bf16["n"] == 50 and bf16["accuracy"] >= 0.8 and 0.0 <= bf16["fid"] < 200
    assert set(bf16["per_digit_accuracy"]) == {str(d) for d in range(10)}
    assert bf16["grid"] == str(tmp_path / "digits_bf16.png")
    with Image.open(tmp_path / "digits_bf16.png") as grid:
        assert grid.size == (3 * 32 + 4 * 2, 10 * 32 + 11 * 2)  # 3 samples per digit, one row per digit
    assert report["results"]["real (train split)"]["accuracy"] >= 0.97


def test_eval_command_reports_a_failing_scheme_as_an_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--schemes", "bf16,no-such-scheme", "--n", "1"])
    out = capsys.readouterr().out
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("no-such-scheme"))
    assert "error:" in line and "Traceback" not in out
    assert any(line.startswith("bf16") for line in out.splitlines())


def test_add_eval_command_registers_the_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="quantserve")
    add_eval_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--schemes", "bf16,nf4", "--n", "3", "--json"])
    assert args.func.__module__ == "quantserve.default_model.eval_cli"  # imports evaluate only when it runs
    assert (args.schemes, args.n, args.seed, args.steps, args.guidance, args.json) == ("bf16,nf4", 3, 0, 25, 1.0, True)
    assert args.out is None and args.grid_cols == 16
