"""What a build records about where its output came from (mergekit_mode_build.json), and reading it back.

The output carries its recipe (mergekit_mode_recipe.yml) with paths as the user wrote them,
relative to the recipe's folder. `check` and `edit` need those inputs again, so the build also
records where that folder is, relative to the output (no absolute path leaves the machine in a
published model). `edit` needs more: which output tensor each op made, and whether the inputs
changed since. Inputs are stamped by name, size and modification time of their files, with the
folder's resolved path (hashing the contents would read every input again, as a build does);
an input whose stamp differs counts as changed and everything made from it is built again.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from mergekit_mode import __version__
from mergekit_mode.errors import ModeError
from mergekit_mode.ops import BASE
from mergekit_mode.recipe import LoadedRecipe, load_recipe
from mergekit_mode.safety import read_small_file
from mergekit_mode.writer import RECIPE_FILE

if TYPE_CHECKING:
    from mergekit_mode.plan import Plan

BUILD_FILE = "mergekit_mode_build.json"
FORMAT = 1


def _digest(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _file_entry(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def folder_stamp(folder: Path) -> str:
    """The folder's resolved path and every file in it (name, size, mtime), as one digest."""
    folder = folder.resolve()
    files = sorted(_file_entry(p) for p in folder.iterdir() if p.is_file())
    return _digest([str(folder), files])


def file_stamp(file: Path) -> str:
    return _digest([str(file.resolve()), _file_entry(file)])


def versions() -> dict[str, str]:
    """The code that computed the tensors: a build by another version is not reused by `edit`."""
    try:
        mergekit = version("mergekit")
    except PackageNotFoundError:
        mergekit = "none"
    return {"mergekit_mode": __version__, "mergekit": mergekit}


def row_keys(plan: Plan) -> dict[str, str]:
    """router.mode hidden: what each expert's row depends on (the base, the expert's text, the router's
    settings), by expert name; an edit keeps a row whose key is unchanged."""
    loaded = plan.recipe
    router = loaded.recipe.router
    if router.mode != "hidden":
        return {}
    base = folder_stamp(plan.inputs[BASE].path)
    keys = {}
    for spec, name in zip(loaded.recipe.experts, loaded.recipe.expert_names):
        data = file_stamp(loaded.resolve(spec.data)) if spec.data is not None else None
        keys[name] = _digest([base, data, spec.prompts, spec.negative_prompts, spec.max_tokens, router.pooling,
                              router.max_tokens, router.seq_len])
    return keys


def record(plan: Plan, out: Path) -> dict:
    """The build record written beside the weights (`out`: the final folder, for the relative path)."""
    return {
        "format": FORMAT,
        "versions": versions(),
        "recipe_dir": os.path.relpath(plan.recipe.path.parent.resolve(), out.resolve()),
        "inputs": {key: folder_stamp(folder.path) for key, folder in plan.inputs.items()},
        "tensors": {t.name: repr(t.op) for t in plan.tensors},
        "router_rows": row_keys(plan),
    }


def record_bytes(plan: Plan, out: Path) -> bytes:
    return (json.dumps(record(plan, out), indent=1, sort_keys=True) + "\n").encode()


def read_record(model: Path) -> Optional[dict]:
    """The build record of a model folder; None for folders built before records existed."""
    file = model / BUILD_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(read_small_file(file))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModeError(f"MODEL: {file} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModeError(f"MODEL: {file} is not a build record this mergekit-mode reads (format {FORMAT})")
    return data


def built_recipe(model: Path, recipe_dir: Optional[Path] = None) -> LoadedRecipe:
    """The recipe a model folder was built from, with its paths resolving where they did at build time:
    against `recipe_dir` when given, else the folder the build record names (else MODEL's parent)."""
    if not (model / RECIPE_FILE).is_file():
        raise ModeError(f"MODEL: {model} has no {RECIPE_FILE}; give a folder that mergekit-mode built")
    loaded = load_recipe(model / RECIPE_FILE)
    if recipe_dir is None:
        build = read_record(model)
        recipe_dir = (model / build["recipe_dir"]) if build else model.parent
    return LoadedRecipe(recipe=loaded.recipe, path=Path(os.path.normpath(recipe_dir)) / RECIPE_FILE, text=loaded.text)
