"""The command surface: help, version, schema, and the default command."""

from __future__ import annotations

import json
import subprocess
import sys

from mergekit_mode import __version__


def test_help_lists_every_command(run_cli):
    result = run_cli("--help")
    assert result.code == 0
    for command in ("build", "validate", "schema", "demo", "export-gguf", "eval", "report", "check", "edit"):
        assert command in result.out
    assert "mergekit-mode RECIPE.yml OUT/" in result.out


def test_version(run_cli):
    result = run_cli("--version")
    assert result.code == 0 and __version__ in result.out


def test_schema_is_the_recipes_json_schema(run_cli):
    result = run_cli("schema")
    schema = json.loads(result.out)
    assert {"base_model", "experts", "router", "output"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False  # unknown keys are errors


def test_console_script_runs_the_default_command(llama, tmp_path):
    """`mergekit-mode recipe.yml out/` (no subcommand), as installed, in a fresh process."""
    from tests.conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts)
    exe = [sys.executable, "-m", "mergekit_mode"]
    done = subprocess.run([*exe, str(recipe), str(tmp_path / "out"), "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "config.json").exists()
    bad = subprocess.run([*exe, str(tmp_path / "none.yml"), str(tmp_path / "o2")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_demo_refuses_a_non_empty_folder(tmp_path, run_cli):
    (tmp_path / "keep.txt").write_text("mine")
    result = run_cli("demo", tmp_path)
    assert result.code == 2 and "not empty" in result.err and "--force" in result.err
    assert (tmp_path / "keep.txt").read_text() == "mine"
