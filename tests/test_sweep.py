"""`mergekit-mode sweep`: every router variant of one recipe built and evaluated side by side."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoModelForCausalLM

from mergekit_mode.build import RECIPE_FILE
from mergekit_mode.toy import write_corpus
from tests.conftest import write_recipe

MODES = ["gateless", "noisy", "hidden", "trained"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-texts")
    return {d: write_corpus(d, root / f"{d}.txt", 1500, seed=5) for d in ("arithmetic", "code", "prose")}


@pytest.fixture(scope="module")
def swept(llama, texts, tmp_path_factory):
    """The llama experts swept over four modes from a trained-router recipe with its own settings."""

    root = tmp_path_factory.mktemp("sweep")
    recipe = write_recipe(root / "r.yml", llama.base, llama.experts, names=list(texts),
                          router={"mode": "trained", "experts_per_token": 2, "seed": 3, "max_tokens": 400,
                                  "train": {"steps": 3}})
    spec = yaml.safe_load(recipe.read_text())
    for expert, file in zip(spec["experts"], texts.values()):
        expert["data"] = str(file)
    recipe.write_text(yaml.safe_dump(spec))
    return recipe, root / "out"


def _data(texts) -> list[str]:
    return [arg for name, file in texts.items() for arg in ("--data", f"{name}={file}")]


def test_every_variant_is_built_loads_and_gets_a_column(swept, texts, run_cli):
    recipe, out = swept
    result = run_cli("sweep", recipe, out, "--router", ",".join(MODES), *_data(texts), "-q")
    assert result.code == 0, result.err
    header, *rows = result.out.strip().split("\n\n")[0].splitlines()
    assert header.split() == ["domain", *MODES, "expert"]  # every domain is named after an expert
    assert [row.split()[0] for row in rows] == list(texts)
    assert all(len(row.split()) == 2 + len(MODES) for row in rows)
    for mode in MODES:
        model = AutoModelForCausalLM.from_pretrained(out / mode)
        built = yaml.safe_load((out / mode / RECIPE_FILE).read_text())["router"]
        assert built["mode"] == mode and built["seed"] == 3
        expected_k = len(texts) if mode == "gateless" else 2
        assert model.config.num_experts_per_tok == expected_k
    # settings kept only where they apply: no top-k for gateless, train only for trained
    assert "experts_per_token" not in yaml.safe_load((out / "gateless" / RECIPE_FILE).read_text())["router"]
    assert "train" not in yaml.safe_load((out / "hidden" / RECIPE_FILE).read_text())["router"]
    assert yaml.safe_load((out / "trained" / RECIPE_FILE).read_text())["router"]["train"] == {"steps": 3}


@pytest.mark.parametrize("routers, message", [
    ("gateless,bogus", "'bogus' is not a router mode"),
    ("noisy,noisy", "given twice"),
    (",", "at least one mode"),
])
def test_bad_router_value_is_a_one_line_error(swept, texts, run_cli, tmp_path, routers, message):
    recipe, _ = swept
    result = run_cli("sweep", recipe, tmp_path / "out", "--router", routers, *_data(texts))
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_mode_the_recipe_cannot_make_fails_before_anything_is_built(llama, texts, run_cli, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts)  # no data: hidden is impossible
    result = run_cli("sweep", recipe, tmp_path / "out", "--router", "gateless,hidden", *_data(texts))
    assert result.code == 2
    assert "(router hidden)" in result.err and "needs data" in result.err
    assert not (tmp_path / "out").exists()


def test_bad_data_fails_before_anything_is_built(swept, run_cli, tmp_path):
    recipe, _ = swept
    result = run_cli("sweep", recipe, tmp_path / "out", "--router", "gateless", "--data", "x=/nonexistent.txt")
    assert result.code == 2
    assert "/nonexistent.txt does not exist" in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_each_domain_is_compared_with_its_expert(swept, texts, llama, run_cli):
    """The expert column is the expert's own perplexity (transformers' loss), the ratios divide by it,
    and gateless gives every expert weight 1/E, so its own weight is exactly 1/3."""
    from tests.test_eval import reference_perplexity

    recipe, out = swept
    result = run_cli("sweep", recipe, out, "--router", "gateless,noisy", *_data(texts), "--own-weight", "-q",
                     "--force")
    assert result.code == 0, result.err
    table, ratios, own = result.out.strip().split("\n\n")
    assert ratios.splitlines()[0].startswith("ratio to the domain's own expert")
    for row, ratio_row, own_row, (name, file), expert in zip(table.splitlines()[1:], ratios.splitlines()[1:],
                                                            own.splitlines()[1:], texts.items(), llama.experts):
        cells = [float(c.rstrip("*!")) for c in row.split()[1:]]
        assert cells[-1] == pytest.approx(reference_perplexity(expert, file, 128)[0], abs=1e-3)
        ratio = [float(c.rstrip("!")) for c in ratio_row.split()[1:]]
        assert ratio == pytest.approx([c / cells[-1] for c in cells[:2]], abs=2e-3)
        assert own_row.split()[1] == "0.333"  # printed to 3 places
