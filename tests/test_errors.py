"""Every user mistake: exit code 2, one line naming the field or file, no traceback, no output."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml

from mergekit_mode import writer
from tests.conftest import write_recipe


def expect_error(result, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def no_litter(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if "mergekit-mode" in p.name]


@pytest.fixture
def recipe(llama, tmp_path) -> Path:
    return write_recipe(tmp_path / "r.yml", llama.base, llama.experts)


def edit(path: Path, change) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


CASES = {
    "unknown key": (lambda d: d["experts"][1].update(modle="x"), ["experts[1].modle", "unknown key"]),
    "unknown router mode": (lambda d: d.update(router={"mode": "smart"}), ["router.mode"]),
    "missing expert folder": (lambda d: d["experts"][1].update(model="./nope"), ["experts[1].model", "nope", "does not exist"]),
    "missing base folder": (lambda d: d.update(base_model="./nobase"), ["base_model", "does not exist"]),
    "reserved name": (lambda d: d["experts"][0].update(name="base_model"), ["experts[0].name", "base model"]),
    "duplicate names": (lambda d: [e.update(name="same") for e in d["experts"]], ["experts[1].name", "unique"]),
    "top-k above experts": (lambda d: d.update(router={"mode": "noisy", "experts_per_token": 4}), ["router.experts_per_token", "3 experts"]),
    "one expert": (lambda d: d.update(experts=d["experts"][:1]), ["experts", "at least 2"]),
    "bad dtype": (lambda d: d.update(dtype="int8"), ["dtype"]),
    "bad shard size": (lambda d: d.update(output={"shard_size": "lots"}), ["output.shard_size", "not a size"]),
    "std on gateless": (lambda d: d.update(router={"mode": "gateless", "std": 0.1}), ["router", "std"]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["build", "validate"])
def test_recipe_mistakes(recipe, tmp_path, run_cli, case, command):
    change, fragments = CASES[case]
    edit(recipe, change)
    args = [recipe, tmp_path / "out"] if command == "build" else ["validate", recipe]
    expect_error(run_cli(*args), str(recipe), *fragments)
    assert not (tmp_path / "out").exists()


def test_yaml_syntax_error_names_the_line(tmp_path, run_cli):
    bad = tmp_path / "r.yml"
    bad.write_text("base_model: ./b\nexperts: [\n")
    expect_error(run_cli("validate", bad), "r.yml", "not valid YAML", "line")


def test_missing_recipe(tmp_path, run_cli):
    expect_error(run_cli(tmp_path / "none.yml", tmp_path / "out"), "none.yml", "does not exist")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_pickle_only_model_is_refused(llama, tmp_path, run_cli):
    bad = _copy(llama.experts[0], tmp_path / "pickled")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    recipe = write_recipe(tmp_path / "r.yml", llama.base, [bad, llama.experts[1]])
    expect_error(run_cli("validate", recipe), "experts[0].model", "pickle", "not read")


def test_architecture_mismatch(llama, mistral, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", llama.base, [llama.experts[0], mistral.experts[0]], names=["l", "m"])
    expect_error(run_cli("validate", recipe), "experts[1].model", "model_type 'mistral'", "'llama'")


def test_shape_mismatch(llama, tmp_path, run_cli):
    bad = _copy(llama.experts[0], tmp_path / "wide")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (bad / "config.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path / "r.yml", llama.base, [llama.experts[1], bad])
    expect_error(run_cli("validate", recipe), "experts[1].model", "intermediate_size is 256", "128")


def test_unsupported_base_architecture(llama, tmp_path, run_cli):
    bad = _copy(llama.base, tmp_path / "gpt")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path / "r.yml", bad, llama.experts)
    expect_error(run_cli("validate", recipe), "base_model", "'gpt2'", "fused attention",
                 "llama, mistral, qwen2, qwen3")


def test_unparsable_config(llama, tmp_path, run_cli):
    bad = _copy(llama.experts[0], tmp_path / "badcfg")
    (bad / "config.json").write_text("{not json")
    recipe = write_recipe(tmp_path / "r.yml", llama.base, [bad, llama.experts[1]])
    expect_error(run_cli("validate", recipe), "experts[0].model", "config.json", "not valid JSON")


def test_validate_reports_each_recipe(llama, tmp_path, run_cli):
    good = write_recipe(tmp_path / "good.yml", llama.base, llama.experts)
    bad = write_recipe(tmp_path / "bad.yml", llama.base, [llama.base, tmp_path / "missing"])
    result = run_cli("validate", good, bad)
    assert result.code == 2
    assert "ok: " in result.out and "good.yml" in result.out
    assert "bad.yml" in result.err and "experts[1].model" in result.err
    assert run_cli("validate", good).code == 0


def test_non_empty_output_needs_force(recipe, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(run_cli(recipe, out, "-q"), str(out), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    expect_error(run_cli(recipe, out, "-q", "--force"), "not a mergekit-mode output", "--force-foreign")
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli(recipe, out, "-q", "--force-foreign").code == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert run_cli(recipe, out, "-q", "--force").code == 0  # now ours: --force replaces it
    no_litter(tmp_path)


def test_output_symlink_is_refused(recipe, tmp_path, run_cli):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    expect_error(run_cli(recipe, tmp_path / "link", "-q"), "symlink")


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), RuntimeError("boom"), OSError(errno.ENOSPC, "No space left")])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_build_leaves_no_output_and_no_litter(recipe, tmp_path, run_cli, monkeypatch, failure, existing):
    out = tmp_path / "out"
    if existing:  # a previous model stays untouched by a failed --force rebuild
        assert run_cli(recipe, out, "-q").code == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = writer.ShardedWriter.write

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 10:
            raise failure
        real(self, name, tensor)

    monkeypatch.setattr(writer.ShardedWriter, "write", failing)
    args = [recipe, out, "-q"] + (["--force"] if existing else [])
    if isinstance(failure, RuntimeError):
        with pytest.raises(RuntimeError):  # a bug keeps its traceback, but still cleans up
            run_cli(*args)
    else:
        result = run_cli(*args)
        if isinstance(failure, KeyboardInterrupt):
            assert result.code == 130 and "interrupted" in result.err
        else:
            expect_error(result, "no space left")
    no_litter(tmp_path)
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()


def test_nan_in_an_input_names_the_tensor(llama, tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    bad = _copy(llama.experts[1], tmp_path / "nan")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yml", llama.base, [llama.experts[0], bad])
    expect_error(run_cli(recipe, tmp_path / "out", "-q"), "nan/model.safetensors", "model.layers.1.mlp.up_proj.weight", "NaN")
    assert not (tmp_path / "out").exists()
    no_litter(tmp_path)


def test_export_gguf_without_converter(llama, tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_CONVERTER", raising=False)
    monkeypatch.setenv("MERGEKIT_MODE_RUNTIMES", str(tmp_path / "empty"))
    expect_error(run_cli("export-gguf", llama.base, "--outfile", tmp_path / "x.gguf"),
                 "convert_hf_to_gguf.py was not found", "LLAMA_CPP_CONVERTER", "setup-runtimes")
    assert not (tmp_path / "x.gguf").exists()


def test_destination_is_checked_before_routers_are_made(recipe, tmp_path, run_cli, monkeypatch):
    """A trained router can take minutes: a refused output must not wait for it."""
    from mergekit_mode import build

    def no_routers(*args, **kwargs):
        raise AssertionError("routers made before the destination was checked")

    monkeypatch.setattr(build, "make_routers", no_routers)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(run_cli(recipe, out, "-q"), "not empty")
