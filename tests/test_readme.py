"""README.md stays true: CI runs the very test command it gives, and its main command names a shipped example."""

from pathlib import Path

ROOT = Path(__file__).parent.parent


def _commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m venv .venv")]


def test_readme_gives_two_setup_commands_and_ci_runs_the_test_one():
    main_cmd, test_cmd = _commands()
    assert "quantserve" in main_cmd and "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_main_command_serves_the_embedded_default():
    main_cmd = _commands()[0]
    assert main_cmd.endswith(".venv/bin/quantserve serve")
    from quantserve.default_model import default_model_dir

    assert (default_model_dir() / "transformer" / "config.json").is_file()
