"""The shipped example recipes validate and build against the folder layout `demo` makes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from mergekit_mode.toy import DOMAINS, make_expert, make_model, write_corpus
from mergekit_mode.toy.adapters import make_demo_adapters

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yml"))


@pytest.fixture(scope="module")
def demo_layout(tmp_path_factory, tokenizer_dir) -> Path:
    """tmp/demo-out/{base,experts/<domain>,data/train/<domain>.txt} like `mergekit-mode demo` leaves, the adapters
    recipes/adapters.yml asks for, the same for Qwen2 and Qwen3 bases (`demo --arch`) in tmp/demo-qwen2/ and
    tmp/demo-qwen3/, and tmp/recipes/."""
    root = tmp_path_factory.mktemp("layout")
    for arch, folder in (("llama", "demo-out"), ("qwen2", "demo-qwen2"), ("qwen3", "demo-qwen3")):
        base = make_model(root / folder / "base", arch, tokenizer_dir=tokenizer_dir, vocab_size=512)
        for i, d in enumerate(DOMAINS):
            make_expert(base, root / folder / "experts" / d, seed=i)
            write_corpus(d, root / folder / "data" / "train" / f"{d}.txt", 6_000, seed=i)
    make_demo_adapters(root / "demo-out")
    shutil.copytree(RECIPES[0].parent, root / "recipes")
    return root


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_example_recipe_builds(demo_layout, run_cli, recipe):
    path = demo_layout / "recipes" / recipe.name
    assert run_cli("validate", path).code == 0
    out = demo_layout / f"out-{recipe.stem}"
    result = run_cli(path, out, "-q")
    assert result.code == 0, result.err
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
