"""The `quantserve` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantserve.cli import main

ROOT = Path(__file__).parent.parent


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "quantserve", "--help"], capture_output=True, text=True, check=True)
    for command in ("inspect", "quantize", "compare", "autotune", "explain", "eval", "serve", "generate", "loadtest", "schemes"):
        assert f"    {command} " in result.stdout, command


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_installed_entry_point_runs_inspect_on_the_example():
    exe = Path(sys.executable).parent / "quantserve"
    result = subprocess.run([str(exe), "inspect", str(ROOT / "examples" / "dit-nf4")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "backend     : bitsandbytes" in result.stdout and "bitsandbytes>=0.39.0" in result.stdout
    assert result.stderr == "", "no backend import noise on a plain inspect"


def _model_dir(tmp_path: Path, block) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"_class_name": "DiTTransformer2DModel", "num_layers": 1}
    if block is not None:
        config["quantization_config"] = block
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_inspect_invalid_config_exits_1_naming_the_field(tmp_path, capsys):
    folder = _model_dir(tmp_path, {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf5"})
    assert main(["inspect", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "bnb_4bit_quant_type" in out and "'nf4'" in out and "INVALID" in out


def test_inspect_unknown_method_and_broken_json(tmp_path, capsys):
    folder = _model_dir(tmp_path, {"quant_method": "awq"})
    assert main(["inspect", str(folder)]) == 1
    assert "quant_method" in capsys.readouterr().out
    (folder / "config.json").write_text("{not json")
    assert main(["inspect", str(folder)]) == 1
    assert "not valid JSON" in capsys.readouterr().out


def test_inspect_unquantized_model_and_missing_path(tmp_path, capsys):
    folder = _model_dir(tmp_path, None)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 2048)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "not quantized" in out and "diffusion_pytorch_model.safetensors (2.0 KiB)" in out
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_inspect_pipeline_directory(tmp_path, capsys):
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "vae").mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    (pipe / "transformer" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel",
                                                                  "quantization_config": {"quant_method": "quanto", "weights_dtype": "int4"}}))
    (pipe / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert main(["inspect", "--json", str(pipe)]) == 0
    reports = {r["component"]: r for r in json.loads(capsys.readouterr().out)}
    assert reports["transformer"]["backend"] == "quanto" and reports["vae"]["backend"] == "none"


def test_inspect_gguf_file(tmp_path, capsys):
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "dit")
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("blk.0.weight", gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.bias", rng.standard_normal(4).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["inspect", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert report["backend"] == "gguf" and report["gguf_tensor_types"] == {"Q8_0": 1, "F32": 1}
    assert report["model_class"] == "dit"
    path.write_bytes(path.read_bytes()[:40])
    assert main(["inspect", str(path)]) == 1
    assert "not a readable GGUF file" in capsys.readouterr().out


def test_schemes_command(capsys):
    assert main(["schemes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "bf16" and rows[0]["quantization_config"] is None
    assert {r["name"]: r["backend"] for r in rows}["gguf-q4_k"] == "gguf"


def _tiny_dit_dir(tmp_path: Path) -> Path:
    from tests.runtime.tiny_models import save_tiny

    return save_tiny("dit", tmp_path / "dit")


def test_quantize_writes_a_checkpoint_and_prints_the_report(tmp_path, capsys):
    model_dir = _tiny_dit_dir(tmp_path)
    assert main(["quantize", str(model_dir), "--scheme", "nf4", "--out", str(tmp_path / "nf4")]) == 0
    out = capsys.readouterr().out
    assert "bitsandbytes" in out and "nf4" in out and "vs bf16" in out and "wrote" in out
    assert json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert main(["inspect", "--load", str(tmp_path / "nf4")]) == 0
    assert "load report" in capsys.readouterr().out


def test_quantize_with_a_config_file_and_bad_input(tmp_path, capsys):
    model_dir = _tiny_dit_dir(tmp_path)
    config = tmp_path / "q.json"
    config.write_text(json.dumps({"quant_method": "bitsandbytes", "load_in_8bit": True}))
    assert main(["quantize", str(model_dir), "--config", str(config), "--out", str(tmp_path / "int8"), "--json"]) == 0
    assert '"backend": "bitsandbytes"' in capsys.readouterr().out
    config.write_text(json.dumps({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"}))
    assert main(["quantize", str(model_dir), "--config", str(config), "--out", str(tmp_path / "bad")]) == 1
    assert "bnb_4bit_quant_type" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["quantize", str(model_dir), "--scheme", "nf3", "--out", str(tmp_path / "x")])


def test_compare_prints_errors_and_worst_layers(tmp_path, capsys):
    model_dir = _tiny_dit_dir(tmp_path)
    assert main(["compare", str(model_dir), "--schemes", "nf4,llm-int8", "--json"]) == 0
    rows = {r["scheme"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["bf16"]["relative_error"] == 0.0
    assert 0 < rows["llm-int8"]["relative_error"] < rows["nf4"]["relative_error"] < 0.3
    assert len(rows["nf4"]["worst_layers"]) == 5 and rows["nf4"]["worst_layers"][0]["relative_error"] > 0
    assert main(["compare", str(model_dir), "--schemes", "nf4,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
