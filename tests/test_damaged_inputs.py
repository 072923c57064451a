"""Damaged input folders are refused from their headers, before any output is written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import write_recipe
from tests.test_errors import expect_error


def damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(folder: Path) -> str:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    return "truncated"


def corrupt_header(folder: Path) -> str:
    file = folder / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[8:20] = b"#not-json!!!"
    file.write_bytes(bytes(raw))
    return "corrupt safetensors header"


def absurd_header_length(folder: Path) -> str:
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    return "corrupt safetensors header"


def wrong_shape(folder: Path) -> str:
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"][:, :100].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return "model.layers.1.mlp.down_proj.weight has shape [64, 100], expected [64, 128]"


def integer_weights(folder: Path) -> str:
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].long()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return "model.layers.0.mlp.up_proj.weight is I64, not a float"


def shard(folder: Path) -> Path:
    """Split the single file into two shards with an index, like a real sharded checkpoint."""
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    weight_map = {n: f for f, part in halves.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / "model.safetensors.index.json"


def missing_shard(folder: Path) -> str:
    shard(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return "names shard model-00002-of-00002.safetensors, which does not exist"


def tensor_in_wrong_shard(folder: Path) -> str:
    index_file = shard(folder)
    index = json.loads(index_file.read_text())
    name = "model.layers.0.mlp.gate_proj.weight"
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    index["weight_map"][name] = second if index["weight_map"][name] == first else first
    index_file.write_text(json.dumps(index))
    return f"places {name} in"


DAMAGES = [truncate, corrupt_header, absurd_header_length, wrong_shape, integer_weights, missing_shard,
           tensor_in_wrong_shard]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
@pytest.mark.parametrize("who", ["base", "expert"])
def test_damaged_input_is_named_before_writing(llama, tmp_path, run_cli, damage, who):
    folder = damaged_copy(llama.base if who == "base" else llama.experts[1], tmp_path / "damaged")
    message = damage(folder)
    if who == "base":
        recipe, field = write_recipe(tmp_path / "r.yml", folder, llama.experts), "base_model"
    else:
        recipe, field = write_recipe(tmp_path / "r.yml", llama.base, [llama.experts[0], folder]), "experts[1].model"
    expect_error(run_cli("validate", recipe), field, message)
    expect_error(run_cli(recipe, tmp_path / "out", "-q"), field, message)
    assert not (tmp_path / "out").exists()
