"""Issue 15, case by case: what an attacker who can write beside an output, or hand over a model
folder, and what a careless user could do. Each ends as one line naming the field or file with
exit code 2 (or a documented warning), with nothing written, deleted or run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import yaml

from mergekit_mode.toy import generate
from tests.conftest import snapshot
from tests.test_errors import expect_error

SPY = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture
def v(llama, tmp_path) -> Path:
    """The issue's folder V: base/, e0/, e1/ (tiny Llamas with a tokenizer) and r.yml."""
    for name, src in (("base", llama.base), ("e0", llama.experts[0]), ("e1", llama.experts[1])):
        shutil.copytree(src, tmp_path / name)
    recipe = {"merge_method": "mode", "base_model": "base", "experts": [{"name": "a", "model": "e0"},
              {"name": "b", "model": "e1"}], "router": {"mode": "noisy", "experts_per_token": 2}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return tmp_path


def recipe_with(v: Path, change) -> Path:
    data = yaml.safe_load((v / "r.yml").read_text())
    change(data)
    (v / "r.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    return v / "r.yml"


@pytest.fixture(scope="module")
def moe(llama, tmp_path_factory) -> Path:
    """A built MoE (what export-gguf and eval are given)."""
    from mergekit_mode.build import plan_recipe, write_model
    from tests.conftest import write_recipe

    root = tmp_path_factory.mktemp("moe")
    write_model(plan_recipe(write_recipe(root / "r.yml", llama.base, llama.experts[:2])), root / "moe", quiet=True)
    return root / "moe"


# 1. Staging folders are made here, never followed through a planted link.

@pytest.mark.parametrize("target", ["base", "e1"])
def test_planted_staging_link_is_refused_and_followed_nowhere(v, run_cli, target):
    (v / ".moe.mergekit-mode-partial").symlink_to(v / target)
    before = snapshot(v)
    expect_error(run_cli(v / "r.yml", v / "moe", "-q"), ".moe.mergekit-mode-partial", "symlink")
    assert snapshot(v) == before and not (v / "moe").exists()


def test_planted_staging_folder_of_someone_else_is_refused(v, run_cli):
    (v / ".moe.mergekit-mode-partial").mkdir()
    (v / ".moe.mergekit-mode-partial" / "theirs.txt").write_text("keep")
    before = snapshot(v)
    expect_error(run_cli(v / "r.yml", v / "moe", "-q"), ".moe.mergekit-mode-partial", "not made by")
    assert snapshot(v) == before


def test_sweep_staging_link_is_refused(v, run_cli):
    data = v / "d.txt"
    data.write_text(generate("arithmetic", 2000, seed=1))
    (v / "sw").mkdir()
    (v / "sw" / ".noisy.mergekit-mode-partial").symlink_to(v / "base")
    before = snapshot(v)
    result = run_cli("sweep", v / "r.yml", v / "sw", "--router", "noisy", "--data", f"d={data}", "-q")
    expect_error(result, ".noisy.mergekit-mode-partial", "symlink")
    assert snapshot(v) == before


@pytest.mark.parametrize("victim", ["e1", "empty"])
def test_staging_folder_swapped_for_a_link_mid_build_overwrites_and_renames_nothing(v, run_cli, monkeypatch, victim):
    """Someone who can write to OUT's parent swaps the staging folder for a link while the build
    runs: no file behind the link is overwritten, the link is not renamed into place, nothing is
    deleted through it."""
    from mergekit_mode import build

    (v / "empty").mkdir()
    real_execute = build.execute

    def swap(plan, routers, writer, *args):
        real_execute(plan, routers, writer, *args)
        stage = v / ".moe.mergekit-mode-partial"
        stage.rename(v / "moved")
        stage.symlink_to(v / victim)

    monkeypatch.setattr(build, "execute", swap)
    before = snapshot(v / "e1")
    result = run_cli(v / "r.yml", v / "moe", "-q")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert snapshot(v / "e1") == before and not (v / "moe").exists()
    assert (v / ".moe.mergekit-mode-partial").is_symlink()


# 2. --force replaces only what may be replaced.

def test_force_onto_the_recipes_folder_is_refused(v, run_cli):
    before = snapshot(v)
    expect_error(run_cli(v / "r.yml", v, "--force", "-q"), "overlaps input recipe")
    assert snapshot(v) == before


def test_force_onto_a_folder_holding_data_files_is_refused(v, run_cli):
    (v / "out").mkdir()
    (v / "out" / "a.txt").write_text(generate("arithmetic", 2000, seed=1))
    (v / "out" / "mergekit_mode_recipe.yml").write_text("looks like ours")
    recipe = recipe_with(v, lambda d: (d.update(router={"mode": "hidden"}),
                                       [e.update(data=f"out/a.txt") for e in d["experts"]]))
    before = snapshot(v)
    expect_error(run_cli(recipe, v / "out", "--force", "-q"), "overlaps input experts[0].data")
    assert snapshot(v) == before


def test_force_onto_an_adapters_folder_is_refused(v, run_cli):
    from mergekit_mode.toy.adapters import make_adapter

    make_adapter(v / "base", v / "ad", seed=1, r=2, lora_alpha=4, target_modules=["gate_proj"])
    recipe = recipe_with(v, lambda d: d["experts"].append({"name": "c", "adapter": "ad"}))
    before = snapshot(v)
    expect_error(run_cli(recipe, v / "ad", "--force", "-q"), "overlaps input c")
    assert snapshot(v) == before


def test_force_onto_a_foreign_folder_needs_force_foreign(v, run_cli):
    (v / "thesis").mkdir()
    (v / "thesis" / "thesis.txt").write_text("years of work")
    expect_error(run_cli(v / "r.yml", v / "thesis", "--force", "-q"), "not a mergekit-mode output", "--force-foreign")
    assert (v / "thesis" / "thesis.txt").read_text() == "years of work"
    assert "--force-foreign" in run_cli("build", "--help").out
    assert run_cli(v / "r.yml", v / "thesis", "--force-foreign", "-q").code == 0
    assert not (v / "thesis" / "thesis.txt").exists()


def test_sweep_force_onto_a_foreign_variant_folder_is_refused(v, run_cli):
    data = v / "d.txt"
    data.write_text(generate("arithmetic", 2000, seed=1))
    (v / "sw" / "noisy").mkdir(parents=True)
    (v / "sw" / "noisy" / "mine.txt").write_text("keep")
    result = run_cli("sweep", v / "r.yml", v / "sw", "--router", "noisy", "--data", f"d={data}", "--force", "-q")
    expect_error(result, "not a mergekit-mode output")
    assert (v / "sw" / "noisy" / "mine.txt").read_text() == "keep"


def test_sweep_data_inside_a_variant_folder_is_refused(v, run_cli):
    (v / "sw" / "noisy").mkdir(parents=True)
    data = v / "sw" / "noisy" / "d.txt"
    data.write_text(generate("arithmetic", 2000, seed=1))
    (v / "sw" / "noisy" / "mergekit_mode_recipe.yml").write_text("looks like ours")
    result = run_cli("sweep", v / "r.yml", v / "sw", "--router", "noisy", "--data", f"d={data}", "--force", "-q")
    expect_error(result, "overlaps input --data d")
    assert data.exists()


def test_demo_force_onto_a_foreign_folder_is_refused(tmp_path, run_cli):
    (tmp_path / "thesis.txt").write_text("years of work")
    expect_error(run_cli("demo", tmp_path, "--force"), "not a mergekit-mode output", "--force-foreign")
    assert (tmp_path / "thesis.txt").read_text() == "years of work"


# 3. Code in a model folder never runs.

@pytest.fixture
def converter(tmp_path, monkeypatch) -> Path:
    """A stand-in for llama.cpp's converter that records that it ran (and writes its outfile)."""
    script = tmp_path / "fake-llama.cpp" / "convert_hf_to_gguf.py"
    script.parent.mkdir()
    script.write_text(SPY.format(marker=str(tmp_path / "converter-ran")) + (
        "import os, sys, time\n"
        f"pathlib.Path({str(tmp_path / 'converter-pid')!r}).write_text(str(os.getpid()))\n"
        "out = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF partial')\n"
        "time.sleep(float(os.environ.get('FAKE_CONVERTER_SLEEP', '0')))\n"))
    monkeypatch.setenv("LLAMA_CPP_CONVERTER", str(script))
    return tmp_path / "converter-ran"


def with_code(src: Path, dst: Path, *, architecture: str | None = None, auto_map: bool = False,
              script: bool = False) -> Path:
    """A copy of a model folder carrying a tokenizer auto_map, a .py file or another architecture."""
    shutil.copytree(src, dst)
    marker = dst.parent / f"{dst.name}-code-ran"
    if auto_map or script:
        (dst / "tokenization_evil.py").write_text(SPY.format(marker=str(marker)))
    if auto_map:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if architecture:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["architectures"] = [architecture]
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("kind, message", [
    ({"architecture": "DreamModel", "auto_map": True}, "auto_map"),
    ({"architecture": "DreamModel"}, "architectures ['DreamModel']"),
    ({"script": True}, "holds Python code (tokenization_evil.py)"),
])
def test_export_gguf_refuses_folders_that_carry_code(moe, tmp_path, run_cli, converter, kind, message):
    model = with_code(moe, tmp_path / "m", **kind)
    expect_error(run_cli("export-gguf", model, "--outfile", tmp_path / "x.gguf"), message)
    assert not converter.exists() and not (tmp_path / "m-code-ran").exists()
    assert not (tmp_path / "x.gguf").exists()


def test_export_gguf_runs_the_converter_on_our_output(moe, tmp_path, run_cli, converter):
    """The control for the refusals above: the same converter does run on a plain output."""
    result = run_cli("export-gguf", moe, "--outfile", tmp_path / "x.gguf")
    assert result.code == 0, result.err
    assert converter.exists() and (tmp_path / "x.gguf").read_bytes() == b"GGUF partial"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize("command", ["eval", "report"])
def test_eval_refuses_a_tokenizer_auto_map_without_running_it(moe, tmp_path, run_cli, command):
    model = with_code(moe, tmp_path / "m", auto_map=True)
    data = tmp_path / "d.txt"
    data.write_text(generate("arithmetic", 500, seed=1))
    expect_error(run_cli(command, model, "--data", f"d={data}"), "auto_map", "tokenizer_config.json")
    assert not (tmp_path / "m-code-ran").exists()


def test_data_router_refuses_a_base_tokenizer_auto_map(v, run_cli):
    with_code(v / "base", v / "evil", auto_map=True)
    (v / "d.txt").write_text(generate("arithmetic", 500, seed=1))
    recipe = recipe_with(v, lambda d: (d.update(base_model="evil", router={"mode": "hidden"}),
                                       [e.update(data="d.txt") for e in d["experts"]]))
    expect_error(run_cli(recipe, v / "out", "-q"), "base_model", "auto_map")
    assert not (v / "evil-code-ran").exists() and not (v / "out").exists()


def pickle_only(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(b"not even a pickle")
    return dst


@pytest.mark.parametrize("command", ["eval", "report", "export-gguf"])
def test_pickle_only_folders_are_refused_everywhere(moe, tmp_path, run_cli, converter, command):
    model = pickle_only(moe, tmp_path / "m")
    data = tmp_path / "d.txt"
    data.write_text(generate("arithmetic", 500, seed=1))
    args = ["--outfile", tmp_path / "x.gguf"] if command == "export-gguf" else ["--data", f"d={data}"]
    expect_error(run_cli(command, model, *args), "MODEL", "pickle")
    assert not converter.exists()


# 4. export-gguf never writes over what it reads.

def test_export_gguf_outfile_inside_the_model_is_refused(moe, tmp_path, run_cli, converter):
    model = shutil.copytree(moe, tmp_path / "m")
    before = snapshot(model)
    expect_error(run_cli("export-gguf", model, "--outfile", model / "model.safetensors", "--force"),
                 "--outfile", "inside MODEL")
    assert snapshot(model) == before and not converter.exists()


def test_export_gguf_outfile_that_is_a_folder_is_one_line(moe, tmp_path, run_cli, converter):
    (tmp_path / "dir").mkdir()
    expect_error(run_cli("export-gguf", moe, "--outfile", tmp_path / "dir", "--force"), "--outfile", "is a folder")


def test_export_gguf_partial_file_link_is_not_followed(moe, tmp_path, run_cli, converter):
    """The old fixed partial name beside the outfile is no longer written through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / ".x.gguf.partial").symlink_to(victim)
    assert run_cli("export-gguf", moe, "--outfile", tmp_path / "x.gguf").code == 0
    assert victim.read_text() == "keep" and (tmp_path / ".x.gguf.partial").is_symlink()


# 5. max_tokens bounds memory.

class CharTokenizer:
    """One id per character, and a record of the longest text it was given (the bound under test)."""

    def __init__(self) -> None:
        self.longest = 0

    def __call__(self, text: str) -> dict:
        self.longest = max(self.longest, len(text))
        return {"input_ids": [ord(c) for c in text]}


def test_one_huge_line_costs_what_max_tokens_needs(tmp_path):
    """An 8 MB single line with max_tokens 500: under 1 MB of Python memory at the peak, and the
    tokenizer sees a few thousand characters. Reading and tokenizing the whole line, as before,
    peaked at 79 MB here with this one-id-per-character stand-in; a real tokenizer costs about 180
    bytes per character it is given (the toy sentencepiece one grew RSS by 724 MB on a 4 MB line,
    the issue measured 12.9 GB on 72 MB), which is why the bound is on what it is given."""
    import tracemalloc

    from mergekit_mode.calibration import iter_documents, tokenize_documents

    (tmp_path / "big.txt").write_text("1 + 2 = 3 ; " * 700_000)
    tok = CharTokenizer()
    tracemalloc.start()
    try:
        pieces = tokenize_documents(iter_documents(tmp_path / "big.txt", "data"), tok, 500, 500)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [len(p) for p in pieces] == [500]
    assert peak < 2**20 and tok.longest < 16_000, (peak, tok.longest)


def test_reading_a_prefix_gives_the_documents_first_tokens(tokenizer_dir, tmp_path):
    """Tokenizing only a prefix of a long line gives exactly what tokenizing all of it gives."""
    from transformers import AutoTokenizer

    from mergekit_mode.calibration import iter_documents, tokenize_documents

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    line = generate("dna", 300_000, seed=2).replace("\n", " ")
    (tmp_path / "d.txt").write_text("\n\n" + line + "\nsecond document\n")
    full = tok(line)["input_ids"]
    for max_tokens in (7, 500, 5000):
        pieces = tokenize_documents(iter_documents(tmp_path / "d.txt", "data"), tok, max_tokens, 10**9)
        assert pieces == [full[:max_tokens]]
    pieces = tokenize_documents(iter_documents(tmp_path / "d.txt", "data"), tok, len(full) + 3, 10**9)
    assert pieces == [full, tok("second document")["input_ids"][:3]]


def test_huge_jsonl_record_is_one_line(tmp_path, run_cli, moe):
    record = json.dumps({"text": "x" * (17 * 2**20)})
    (tmp_path / "d.jsonl").write_text(record + "\n")
    expect_error(run_cli("eval", moe, "--data", f"d={tmp_path / 'd.jsonl'}"), "d.jsonl line 1", "MiB")


# 6. Duplicate keys.

def test_duplicate_yaml_key_names_the_key_and_both_lines(v, run_cli):
    (v / "r.yml").write_text((v / "r.yml").read_text() + "base_model: e1\n")
    text = (v / "r.yml").read_text().splitlines()
    first = text.index("base_model: base") + 1
    for command in ("validate", "build"):
        args = [v / "r.yml"] if command == "validate" else [v / "r.yml", v / "out", "-q"]
        result = run_cli(command, *args)
        assert result.code == 2 and "Traceback" not in result.err
        assert "'base_model' is given twice" in result.err and f"lines {first} and {len(text)}" in result.err
    assert not (v / "out").exists()


# 7. What used to end in tracebacks.

@pytest.mark.parametrize("router, message", [
    ({"mode": "noisy", "seed": 2**64}, ["router.seed", "64-bit"]),
    ({"mode": "noisy", "seed": -2**63 - 1}, ["router.seed", "64-bit"]),
    ({"mode": "trained", "train": {"lr": 1e300}}, ["router.train.lr", "too large"]),
    ({"mode": "trained", "train": {"batch_size": 100_000_000}}, ["router.train.batch_size", "tokens per step"]),
    ({"mode": "noisy", "experts_per_token": True}, ["router.experts_per_token", "got true"]),
])
def test_out_of_range_router_settings_are_one_line(v, run_cli, router, message):
    (v / "d.txt").write_text("1 + 1 = 2\n")
    recipe = recipe_with(v, lambda d: (d.update(router=router), [e.update(data="d.txt") for e in d["experts"]]))
    expect_error(run_cli("validate", recipe), *message)


def test_seed_out_of_range_leaves_no_sweep_folder(v, run_cli):
    (v / "d.txt").write_text(generate("arithmetic", 500, seed=1))
    recipe = recipe_with(v, lambda d: d["router"].update(seed=2**64))
    expect_error(run_cli("sweep", recipe, v / "sw", "--router", "noisy", "--data", f"d={v / 'd.txt'}"), "router.seed")
    assert not (v / "sw").exists()


def test_largest_seed_builds(v, run_cli):
    recipe = recipe_with(v, lambda d: d["router"].update(seed=2**64 - 1))
    assert run_cli(recipe, v / "out", "-q").code == 0


@pytest.mark.parametrize("option", ["--batch-size", "--max-tokens"])
def test_eval_sizes_below_one_are_usage_errors(moe, tmp_path, run_cli, option):
    (tmp_path / "d.txt").write_text("1 + 1 = 2\n")
    expect_error(run_cli("eval", moe, "--data", f"d={tmp_path / 'd.txt'}", option, "0"), option, "x>=1")


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_devices_other_than_cpu_and_cuda_are_refused_up_front(v, moe, run_cli, device):
    from mergekit_mode.toy.adapters import make_adapter

    make_adapter(v / "base", v / "ad", seed=1, r=2, lora_alpha=4, target_modules=["gate_proj"])
    recipe = recipe_with(v, lambda d: d["experts"].append({"name": "c", "adapter": "ad"}))
    (v / "d.txt").write_text("1 + 1 = 2\n")
    expect_error(run_cli(recipe, v / "out", "--device", device, "-q"), "--device", "cpu, cuda")
    expect_error(run_cli("eval", moe, "--data", f"d={v / 'd.txt'}", "--device", device), "--device")
    expect_error(run_cli("sweep", recipe, v / "sw", "--router", "noisy", "--data", f"d={v / 'd.txt'}", "--device",
                         device), "--device")
    assert not (v / "out").exists() and not (v / "sw").exists()


def test_names_longer_than_the_filesystem_allows(v, run_cli):
    long = "x" * 256
    recipe = recipe_with(v, lambda d: d["experts"][0].update(model=long))
    expect_error(run_cli("validate", recipe), "experts[0].model", "256 bytes")
    recipe_with(v, lambda d: d["experts"][0].update(model="e0"))
    expect_error(run_cli(v / "r.yml", v / long, "-q"), "'OUT'", "256 bytes")
    expect_error(run_cli("eval", v / long, "--data", f"d={v / 'r.yml'}"), "'MODEL'", "256 bytes")
    expect_error(run_cli("eval", v / "e0", "--data", f"d={v / long}"), "--data d", "256 bytes")
    expect_error(run_cli(v / "r.yml", v / ("y" * 240), "-q"), "name too long", "staging folder")
    assert [p.name for p in v.iterdir() if p.name.startswith(("x", "y", ".y"))] == []


def test_output_name_that_leaves_room_for_staging_builds(v, run_cli):
    assert run_cli(v / "r.yml", v / ("y" * 227), "-q").code == 0


# 8. The smaller ones.

def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def damaged_copies(folder: Path) -> dict[str, Path]:
    """Copies of a model folder whose model.safetensors the safetensors library rejects."""
    from mergekit_mode.inputs import read_safetensors_header

    src = folder / "model.safetensors"
    infos = read_safetensors_header(src)
    blob = src.read_bytes()
    start = min(i.offset for i in infos.values())
    data = blob[start:]
    header = {n: {"dtype": "F32", "shape": list(i.shape), "data_offsets": [i.offset - start, i.offset - start + i.nbytes]}
              for n, i in infos.items()}
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    first, second = names[0], names[1]
    same_shape = [(a, b) for a in names for b in names if a < b and header[a]["shape"] == header[b]["shape"]][0]
    cases = {}

    def case(name: str, hdr: dict | str, body: bytes) -> None:
        dst = folder.parent / f"{folder.name}-{name}"
        shutil.copytree(folder, dst)
        if isinstance(hdr, str):
            (dst / "model.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr.encode() + body)
        else:
            write_raw_safetensors(dst / "model.safetensors", hdr, body)
        cases[name] = dst

    case("trailing", header, data + b"\0" * 8)
    a, b = same_shape  # b's bytes claimed to be a's: two tensors, one memory
    case("alias", {**header, b: {**header[b], "data_offsets": header[a]["data_offsets"]}}, data)
    overlap = {**header, second: {**header[second], "data_offsets": [x - 4 for x in header[second]["data_offsets"]]}}
    case("overlap", overlap, data)
    raw = json.dumps(header)
    dup = raw[:-1] + ", " + json.dumps({first: header[first]})[1:]  # the first tensor's key twice
    case("duplicate", dup, data)
    return cases


def test_safetensors_the_library_rejects_are_refused(llama, tmp_path, run_cli):
    from safetensors.torch import load_file

    from tests.conftest import write_recipe

    shutil.copytree(llama.experts[0], tmp_path / "e")
    cases = damaged_copies(tmp_path / "e")
    assert set(cases) == {"trailing", "alias", "overlap", "duplicate"}
    for name, folder in cases.items():
        if name != "duplicate":  # the library's own verdict, the reference (it keeps the last duplicate)
            with pytest.raises(Exception):
                load_file(folder / "model.safetensors")
        recipe = write_recipe(tmp_path / f"{name}.yml", llama.base, [llama.experts[1], folder])
        expect_error(run_cli("validate", recipe), "experts[1].model", "model.safetensors", "safetensors")


@pytest.fixture
def signal_handlers():
    """main() installs its handlers in this process; put the previous ones back afterwards."""
    from mergekit_mode.cli import INTERRUPTS

    saved = {sig: signal.getsignal(sig) for sig in INTERRUPTS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
def test_other_signals_mid_write_clean_up_like_sigterm(v, run_cli, monkeypatch, signal_handlers, sig):
    """The signal arrives after the first tensor is written (tests/test_reliability.py sends SIGINT
    and SIGTERM to a real process the same way)."""
    from mergekit_mode import build

    real_execute = build.execute

    def interrupted(plan, routers, writer, device, progress):
        def first_write_then_signal(item):
            progress(item)
            os.kill(os.getpid(), sig)

        real_execute(plan, routers, writer, device, first_write_then_signal)

    monkeypatch.setattr(build, "execute", interrupted)
    before = snapshot(v)
    result = run_cli(v / "r.yml", v / "moe", "-q")
    assert result.code == 130 and "interrupted" in result.err and "Traceback" not in result.err
    assert snapshot(v) == before


def test_signal_during_export_gguf_leaves_no_partial_file(moe, tmp_path, run_cli, converter, monkeypatch,
                                                          signal_handlers):
    import threading

    monkeypatch.setenv("FAKE_CONVERTER_SLEEP", "60")

    def hang_up_once_converting() -> None:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".x.gguf.partial-*/x.gguf")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGHUP)

    threading.Thread(target=hang_up_once_converting, daemon=True).start()
    result = run_cli("export-gguf", moe, "--outfile", tmp_path / "x.gguf")
    assert result.code == 130 and "Traceback" not in result.err
    with pytest.raises(ProcessLookupError):  # the converter was stopped, not waited for
        os.kill(int((tmp_path / "converter-pid").read_text()), 0)
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.model", b"\x00garbage" * 10, "tokenizer.model does not load as a tokenizer"),
    ("tokenizer.json", b'{"version": 1}', "tokenizer.json does not load as a tokenizer"),
    ("tokenizer_config.json", b"{", "tokenizer_config.json is not valid JSON"),
])
def test_base_with_a_corrupt_tokenizer_is_refused(v, run_cli, name, content, message):
    (v / "base" / name).write_bytes(content)
    for args in (["validate", v / "r.yml"], [v / "r.yml", v / "out", "-q"]):
        result = run_cli(*args)
        errors = [line for line in result.err.splitlines() if not line.startswith("warning: ")]  # experts differ
        assert result.code == 2 and len(errors) == 1 and "Traceback" not in result.err, result.err
        assert "base_model: " in errors[0] and message in errors[0], errors
    assert not (v / "out").exists()


def test_base_without_a_tokenizer_is_a_warning(v, run_cli):
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (v / "base" / name).unlink()
    result = run_cli(v / "r.yml", v / "out", "-q")
    assert result.code == 0 and "warning: base_model:" in result.err and "has no tokenizer" in result.err


def test_tokenizer_link_out_of_the_folder_is_refused_not_copied(v, run_cli):
    secret = v / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (v / "base" / "tokenizer.json").symlink_to(secret)
    for args in (["validate", v / "r.yml"], [v / "r.yml", v / "out", "-q"]):
        expect_error(run_cli(*args), "base_model", "tokenizer.json", "points outside")
    assert not (v / "out").exists()


def test_tokenizer_link_into_a_hub_cache_blob_is_copied(v, run_cli):
    """Hugging Face cache snapshots are links into the repository's blobs/: those are the folder's own."""
    repo = v / "models--org--base"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(v / "base", snapshot)
    (snapshot / "tokenizer.model").rename(repo / "blobs" / "f00d")
    (snapshot / "tokenizer.model").symlink_to("../../blobs/f00d")
    recipe = recipe_with(v, lambda d: d.update(base_model=str(snapshot)))
    assert run_cli(recipe, v / "out", "-q").code == 0
    assert (v / "out" / "tokenizer.model").read_bytes() == (repo / "blobs" / "f00d").read_bytes()


@pytest.mark.parametrize("shard", ["../e1/model.safetensors", "/etc/passwd", "link.safetensors"])
def test_index_shard_outside_the_folder_is_refused(v, run_cli, shard):
    (v / "e0" / "link.safetensors").symlink_to(v / "e1" / "model.safetensors")
    (v / "e0" / "model.safetensors").unlink()
    names = json.loads((v / "e1" / "model.safetensors").read_bytes()[8:8 + struct.unpack(
        "<Q", (v / "e1" / "model.safetensors").read_bytes()[:8])[0]])
    index = {"weight_map": {n: shard for n in names if n != "__metadata__"}}
    (v / "e0" / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(run_cli("validate", v / "r.yml"), "experts[0].model", "index.json")


def test_adapter_tensors_outside_target_modules_are_refused(v, run_cli):
    from mergekit_mode.toy.adapters import make_adapter

    make_adapter(v / "base", v / "ad", seed=1, r=2, lora_alpha=4, target_modules=["gate_proj", "q_proj"])
    cfg = json.loads((v / "ad" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["gate_proj"]  # q_proj's tensors stay in the file; peft would not load them
    (v / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    recipe = recipe_with(v, lambda d: d["experts"].append({"name": "c", "adapter": "ad"}))
    expect_error(run_cli("validate", recipe), "experts[2].adapter", "q_proj", "target_modules")


def test_eval_of_a_missing_folder_does_not_ask_the_hub(tmp_path, run_cli, monkeypatch):
    import socket

    asked = []

    def no_network(*args, **kwargs):
        asked.append(args)
        raise socket.gaierror("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    (tmp_path / "d.txt").write_text("1 + 1 = 2\n")
    expect_error(run_cli("eval", tmp_path / "org-name", "--data", f"d={tmp_path / 'd.txt'}"), "MODEL",
                 "does not exist")
    assert not asked


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "huge"])
def test_config_that_is_not_a_small_regular_file_is_refused_without_reading(v, run_cli, kind):
    config = v / "e0" / "config.json"
    real = json.loads(config.read_text())
    config.unlink()
    if kind == "dev-zero":
        config.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(config)
    else:  # valid, and 65 MB
        config.write_text(json.dumps({**real, "padding": " " * 65 * 2**20}))
    expect_error(run_cli("validate", v / "r.yml"), "experts[0].model", "config.json")


def test_experts_that_differ_from_the_base_are_warned_about(v, run_cli):
    cfg = json.loads((v / "e1" / "config.json").read_text())
    cfg.update(rope_theta=1234.0, hidden_act="gelu")
    (v / "e1" / "config.json").write_text(json.dumps(cfg))
    result = run_cli("validate", v / "r.yml")
    assert result.code == 0, result.err
    warnings = [line for line in result.err.splitlines() if line.startswith("warning: ")]
    assert any("experts[1].model: rope_theta is 1234.0" in w for w in warnings), warnings
    assert any("experts[1].model: hidden_act is gelu, the base's is silu" in w for w in warnings), warnings
    assert len(warnings) == 2  # tokenizers are compared token by token: tests/test_tokenizer_audit.py


