"""The property that the staging and --force bugs of issue 15 broke, as a test: a run only ever
deletes or writes inside OUT (and its own staging folder, gone when it ends), and only what it
created or was told to replace.

OUT is placed everywhere relative to every kind of input (the base, a fine-tuned expert, a LoRA
adapter, a data file, the recipe itself): equal to it, inside it, as its parent, as a sibling,
and through symlinks (OUT a link to it, OUT inside a link to it, OUT reached through a link to
its parent), and beside it with a link to the input planted at its staging name. Each placement runs one of build, build --force, build --force-foreign, sweep and
sweep --force, rotated so that every relation meets every command across the input kinds. After
each run, every file, folder and link under the test's folder (inputs, unrelated files, the
links themselves) is compared with before: outside the real location of OUT nothing may differ;
a refused run (exit 2, one line) may change nothing at all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from mergekit_mode.toy import generate, make_expert, make_model
from mergekit_mode.toy.adapters import make_adapter
from tests.conftest import snapshot

KINDS = ("base", "expert", "adapter", "data", "recipe")
RELATIONS = ("equal", "inside", "parent", "sibling", "link-to", "link-inside", "link-parent", "planted-staging")
COMMANDS = ("build", "build --force", "build --force-foreign", "sweep", "sweep --force")
INPUTS = ("w/base", "w/expert", "w/adapter", "w/data/a.txt", "w/data/b.txt", "w/recipe/r.yml")
ANCHORS = {"base": "w/base", "expert": "w/expert", "adapter": "w/adapter", "data": "w/data/a.txt",
           "recipe": "w/recipe/r.yml"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir) -> Path:
    """w/{base,expert,adapter}/, w/data/{a,b}.txt, w/recipe/r.yml (paths relative to it), and
    unrelated files inside and outside w/, including a user's link into the base."""
    root = tmp_path_factory.mktemp("world")
    w = root / "w"
    base = make_model(w / "base", tokenizer_dir=tokenizer_dir, vocab_size=512)
    make_expert(base, w / "expert", seed=1, mlp_scale=0.5)
    make_adapter(base, w / "adapter", seed=2, r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj"])
    (w / "data").mkdir()
    (w / "data" / "a.txt").write_text(generate("arithmetic", 3000, seed=1))
    (w / "data" / "b.txt").write_text(generate("dna", 3000, seed=2))
    (w / "recipe").mkdir()
    recipe = {"base_model": "../base",
              "experts": [{"name": "full", "model": "../expert", "data": "../data/a.txt"},
                          {"name": "lora", "adapter": "../adapter", "data": "../data/b.txt"}],
              "router": {"mode": "hidden", "max_tokens": 200}}
    (w / "recipe" / "r.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (w / "recipe" / "notes.txt").write_text("the user's notes beside the recipe")
    (w / "unrelated" / "deep").mkdir(parents=True)
    (w / "unrelated" / "deep" / "thesis.txt").write_text("years of work")
    (w / "unrelated" / "shortcut").symlink_to("../base")
    (root / "outside.txt").write_text("not ours")
    return root


def place(root: Path, kind: str, relation: str, command: str) -> Path:
    """OUT for `relation` to the input of `kind`, making the links it goes through ("planted-staging":
    a sibling OUT whose staging name someone made a link to the input, before the run)."""
    anchor = root / ANCHORS[kind]
    folder = anchor if anchor.is_dir() else anchor.parent  # a file's relations are to its folder
    if relation == "equal":
        return anchor
    if relation == "inside":
        return folder / "out"
    if relation == "parent":
        return anchor.parent
    if relation in ("sibling", "planted-staging"):
        out = folder.parent / "out-sibling"
        if relation == "planted-staging":
            staged = out / "gateless" if command.startswith("sweep") else out
            staged.parent.mkdir(exist_ok=True)
            (staged.parent / f".{staged.name}.mergekit-mode-partial").symlink_to(anchor)
        return out
    link = root / "link"
    if relation == "link-to":
        link.symlink_to(anchor)
        return link
    if relation == "link-inside":
        link.symlink_to(folder)
        return link / "out"
    link.symlink_to(anchor.parent)  # link-parent: OUT is the input, spelled through a link
    return link / anchor.name


def prepare(out: Path, command: str) -> None:
    """What --force and --force-foreign get to replace when OUT (or OUT/<mode>) does not exist yet:
    an earlier output of ours, or a folder of the user's."""
    if "--force" not in command or os.path.lexists(out):
        return
    target = out / "gateless" if command.startswith("sweep") else out
    target.mkdir(parents=True)
    if command.endswith("--force-foreign"):
        (target / "old-user-file.txt").write_text("replaced on request")
    else:
        (target / "mergekit_mode_recipe.yml").write_text("an earlier build")
        (target / "model.safetensors").write_bytes(b"old weights")


def run(run_cli, root: Path, command: str, out: Path):
    recipe = root / "w" / "recipe" / "r.yml"
    name, *flags = command.split()
    if name == "build":
        return run_cli(recipe, out, "-q", *flags)
    return run_cli("sweep", recipe, out, "--router", "gateless", "--data", f"d={root / 'w' / 'data' / 'a.txt'}",
                   "--ctx", "16", "--max-tokens", "64", "-q", *flags)


CASES = [(kind, relation, COMMANDS[(k + r) % len(COMMANDS)])
         for k, kind in enumerate(KINDS) for r, relation in enumerate(RELATIONS)]


def test_every_relation_meets_every_command():
    for relation in RELATIONS:
        assert {command for _, rel, command in CASES if rel == relation} == set(COMMANDS)


@pytest.mark.parametrize("kind, relation, command", CASES)
def test_a_run_changes_nothing_outside_out(world, tmp_path, run_cli, kind, relation, command):
    root = tmp_path / "case"
    shutil.copytree(world, root, symlinks=True)
    out = place(root, kind, relation, command)
    prepare(out, command)
    before = snapshot(root)

    result = run(run_cli, root, command, out)

    after = snapshot(root)
    inputs = [k for k in before if any(k == i or k.startswith(i + os.sep) for i in INPUTS)]
    assert inputs and {k: after.get(k) for k in inputs} == {k: before[k] for k in inputs}  # every input byte
    if result.code != 0:  # refused: one line, and not a byte, file or link changed anywhere
        lines = result.err.strip().splitlines()
        assert result.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.err
        assert after == before
        return
    assert not out.is_symlink() and out.is_dir()
    model = out / "gateless" if command.startswith("sweep") else out
    assert (model / "config.json").is_file() and (model / "mergekit_mode_recipe.yml").is_file()
    real_out = str(Path(os.path.realpath(out)).relative_to(root.resolve()))
    real_model = str(Path(os.path.realpath(model)).relative_to(root.resolve()))

    def under(key: str, folder: str) -> bool:
        return key == folder or key.startswith(folder + os.sep)

    outside = [k for k in before.keys() | after.keys() if not under(k, real_out)]
    assert {k: before.get(k) for k in outside} == {k: after.get(k) for k in outside}
    replaced = [k for k in before if under(k, real_out) and k != real_out and after.get(k) != before[k]]
    if replaced:  # only what the user asked to replace: an earlier output with --force, anything with -foreign
        assert all(under(k, real_model) for k in replaced), replaced
        assert command.endswith("--force-foreign") or (
            command.endswith("--force") and real_model + os.sep + "mergekit_mode_recipe.yml" in before), replaced
