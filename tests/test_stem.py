"""Stem merging: the shared tensors equal what mergekit itself makes of the dense experts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from mergekit_mode.toy import make_expert, make_model
from tests.conftest import Family, write_recipe
from tests.test_build import read_tensor
from tests.test_errors import expect_error

NAMES = ["a", "b", "c"]
LAYERS = 2
SHARED = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{t}" for i in range(LAYERS) for t in (
        "input_layernorm.weight", "post_attention_layernorm.weight",
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"))
]
MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _perturb(folder: Path, names: list[str], seed: int) -> None:
    """Fine-tunes move embeddings and norms too; make_expert moves only MLP and attention."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        tensors[name] = tensors[name] + 0.1 * torch.randn(tensors[name].shape, generator=gen)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer_dir) -> Family:
    """A tiny Llama and 3 experts whose attention, norms and embeddings all differ from it."""
    root = tmp_path_factory.mktemp("stem")
    base = make_model(root / "base", tokenizer_dir=tokenizer_dir, vocab_size=512, num_layers=LAYERS)
    experts = []
    for i, name in enumerate(NAMES):
        expert = make_expert(base, root / name, seed=i + 1, mlp_scale=0.5, attn_scale=0.3)
        _perturb(expert, [n for n in SHARED if "self_attn" not in n], seed=i)
        experts.append(expert)
    return Family(base, experts)


def mergekit_config(stem: dict, family: Family) -> MergeConfiguration:
    """The same merge as a mergekit config: the stem's names become the folders they name."""
    folders = dict(zip(NAMES, map(str, family.experts)), base_model=str(family.base))
    models = [m if isinstance(m, dict) else {"model": m} for m in stem.get("models", NAMES)]
    config = {
        "merge_method": stem["merge_method"],
        "dtype": "float32",
        "parameters": stem.get("parameters", {}),
        "models": [{**m, "model": folders[m["model"]]} for m in models],
    }
    if "base_model" in stem or stem["merge_method"] == "ties":
        config["base_model"] = folders[stem.get("base_model", "base_model")]
    return MergeConfiguration.model_validate(config)


STEMS = {
    "linear": {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 0.5}},
                   {"model": "c", "parameters": {"weight": 2.0}}],
    },
    "ties": {  # the base by default; per-model density, and a weight gradient over the layers
        "merge_method": "ties",
        "parameters": {"density": 0.5, "weight": [0.3, 1.0]},
        "models": [{"model": "a", "parameters": {"density": 0.7}}, "b", {"model": "c", "parameters": {"weight": 0.8}}],
    },
}


@pytest.mark.parametrize("method", STEMS)
def test_stem_equals_mergekits_own_merge(family, tmp_path, run_cli, method):
    stem = STEMS[method]
    recipe = write_recipe(tmp_path / "r.yml", family.base, family.experts, names=NAMES, stem=stem)
    result = run_cli(recipe, tmp_path / "moe", "-q")
    assert result.code == 0, result.err
    run_merge(mergekit_config(stem, family), str(tmp_path / "dense"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    for name in SHARED:
        merged = read_tensor(tmp_path / "moe", name)
        torch.testing.assert_close(merged, read_tensor(tmp_path / "dense", name), rtol=1.3e-6, atol=1e-7)
        assert not torch.equal(merged, read_tensor(family.base, name)), name  # the stem really changed
    for e, expert in enumerate(family.experts):  # experts are still each expert's own MLP
        for layer in range(LAYERS):
            for proj, mlp in MLP.items():
                moe = read_tensor(tmp_path / "moe", f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}.weight")
                assert torch.equal(moe, read_tensor(expert, f"model.layers.{layer}.mlp.{mlp}.weight"))
    card = (tmp_path / "moe" / "README.md").read_text()
    assert f"`{method}` of a, b, c" in card and '"weight"' in card


def test_dry_run_shows_each_tensors_merge(family, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", family.base, family.experts, names=NAMES, stem=STEMS["ties"])
    result = run_cli(recipe, tmp_path / "out", "--dry-run")
    assert result.code == 0, result.err
    lines = {line.split()[0]: line for line in result.out.splitlines() if line.startswith("model.")}
    # layer 0 has t=0 (weight 0.3 from the gradient), layer 1 has t=1 (weight 1.0); c overrides it
    assert lines["model.layers.0.self_attn.q_proj.weight"].endswith(
        "<- ties(a[weight=0.3 density=0.7], b[weight=0.3 density=0.5], c[weight=0.8 density=0.5], base_model*; "
        "int8_mask=False normalize=True rescale=False lambda=1.0)")
    assert "b[weight=1.0 density=0.5]" in lines["model.layers.1.self_attn.q_proj.weight"]
    assert not (tmp_path / "out").exists()


def test_randomized_method_is_reproducible(family, tmp_path, run_cli):
    def build(seed: int) -> str:
        stem = {"merge_method": "dare_ties", "parameters": {"weight": 1.0, "density": 0.5}, "seed": seed}
        recipe = write_recipe(tmp_path / "r.yml", family.base, family.experts, names=NAMES, stem=stem)
        assert run_cli(recipe, tmp_path / "out", "-q", "--force").code == 0
        return hashlib.sha256((tmp_path / "out" / "model.safetensors").read_bytes()).hexdigest()

    first = build(0)
    assert build(0) == first and build(1) != first


ERRORS = {
    "unknown method": ({"merge_method": "tiez"}, ["stem.merge_method", "'tiez'", "available:", "ties", "linear"]),
    "unknown parameter": ({"merge_method": "ties", "parameters": {"weight": 1, "densty": 0.5}},
                          ["stem.parameters.densty", "unknown parameter of ties", "density", "weight"]),
    "unknown model": ({"merge_method": "linear", "parameters": {"weight": 1}, "models": ["a", "x"]},
                      ["stem.models[1].model", "unknown model 'x'", "a, b, c", "base_model"]),
    "unknown base": ({"merge_method": "ties", "base_model": "nope", "parameters": {"weight": 1}}, ["stem.base_model"]),
    "missing required": ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}, "b"]},
                         ["stem.models[1].parameters", "missing weight", "linear"]),
    "shared set per model": ({"merge_method": "ties", "parameters": {"weight": 1},
                              "models": [{"model": "a", "parameters": {"normalize": False}}, "b"]},
                             ["stem.models[0].parameters.normalize", "stem.parameters"]),
    "bad value": ({"merge_method": "ties", "parameters": {"weight": 1, "density": "half"}},
                  ["stem.parameters.density", "number"]),
    "contract": ({"merge_method": "slerp", "parameters": {"t": 0.5}}, ["stem.models", "slerp", "exactly 2"]),
    "listed twice": ({"merge_method": "linear", "parameters": {"weight": 1}, "models": ["a", "a"]},
                     ["stem.models[1].model", "twice"]),
    "not a mapping": ("ties", ["stem", "merge_method"]),
    "unknown key": ({"merge_method": "ties", "parameter": {}}, ["stem.parameter", "unknown key"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_stem_mistakes(family, tmp_path, run_cli, case):
    stem, fragments = ERRORS[case]
    recipe = write_recipe(tmp_path / "r.yml", family.base, family.experts, names=NAMES, stem=stem)
    expect_error(run_cli("validate", recipe), "r.yml", *fragments)


def test_schema_offers_base_or_a_merge(run_cli):
    result = run_cli("schema")
    stem = json.loads(result.out)["properties"]["stem"]
    assert {"const": "base"} in stem["anyOf"] and {"$ref": "#/$defs/StemSpec"} in stem["anyOf"]
