"""Property: for any recipe, `validate` and the build agree, and nothing ends in a traceback.

Recipes are drawn around a valid one (full and LoRA experts, every router mode, stems): each
field kept, dropped, replaced by a plausible mistake or a value of another type, or joined by a
misspelt key. Whatever comes out, either both `validate` and the build
accept it and the model loads in transformers, or both reject it with exit code 2 and one line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True), st.text(max_size=6),
                 st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


def field(valid: st.SearchStrategy, plausible: list | None = None) -> st.SearchStrategy:
    """Mostly a valid value; sometimes a plausible mistake or junk: most recipes have 0-2 faults."""
    wrong = st.one_of(JUNK, st.sampled_from(plausible)) if plausible else JUNK
    return st.integers(0, 11).flatmap(lambda roll: wrong if roll == 0 else valid)


@st.composite
def recipes(draw, base: str, experts: list[str], adapter: str) -> dict:
    n = draw(st.sampled_from([1, 2, 2, 3, 3]))
    mode = draw(field(st.sampled_from(["gateless", "noisy", "random", "hidden", "trained"]), ["smart"]))
    data_mode = mode in ("hidden", "trained")
    specs = []
    for i in range(n):
        kind = draw(st.sampled_from(["model", "model", "adapter", "both"]))
        spec = {}
        if kind != "adapter":
            spec["model"] = draw(field(st.sampled_from([*experts, base]), ["./missing"]))
        if kind != "model":
            spec["adapter"] = draw(field(st.just(adapter), ["./missing-lora", base]))
        if draw(st.booleans()):
            spec["name"] = draw(field(st.just(f"e{i}"), ["base_model", "e0"]))
        if data_mode or draw(st.integers(0, 5)) == 0:
            spec["prompts"] = draw(field(st.just(["7 + 5 = 12 ;", "ACGT"]), [[]]))
        specs.append(spec)
    router = {"mode": mode}
    if router["mode"] == "trained":  # few steps: the property is about agreement, not quality
        router["train"] = {"steps": draw(field(st.integers(1, 3), [0])), "batch_size": 2}
    if draw(st.booleans()):
        router["experts_per_token"] = draw(field(st.integers(1, 2), [0, 4]))
    if router["mode"] == "noisy" and draw(st.booleans()):
        router["std"] = draw(field(st.floats(0.001, 1.0), [0.0, -1.0]))
    if draw(st.booleans()):
        router["seed"] = draw(field(st.integers(0, 9)))
    recipe = {"base_model": draw(field(st.just(base), ["./nobase"])), "experts": specs, "router": router}
    if draw(st.booleans()):
        recipe["dtype"] = draw(field(st.sampled_from(["float32", "bfloat16", "float16"]), ["int8"]))
    if draw(st.booleans()):
        recipe["output"] = {"shard_size": draw(field(st.sampled_from(["100KB", "2GB", 300000]), ["0", "lots"]))}
    if draw(st.booleans()):
        recipe["stem"] = draw(field(st.sampled_from(["base", {"merge_method": "linear", "parameters": {"weight": 1.0}}]),
                                    [{"merge_method": "nope"}, {"merge_method": "ties"}]))
    if draw(st.integers(0, 5)) == 0:
        recipe[draw(st.sampled_from(["experts_per_token", "routre", "merge_method"]))] = draw(JUNK)
    return recipe


def one_error_line(err: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory) -> str:
    from mergekit_mode.toy.adapters import make_adapter

    return str(make_adapter(llama.base, tmp_path_factory.mktemp("fuzz") / "lora", seed=0, r=2, lora_alpha=4,
                            target_modules=["up_proj", "q_proj"]))


def test_validate_and_build_agree(llama, adapter, run_cli):
    experts = [str(p) for p in llama.experts]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(recipes(str(llama.base), experts, adapter))
    def check(recipe: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "r.yml"
            path.write_text(yaml.safe_dump(recipe))
            validated = run_cli("validate", path)
            built = run_cli(path, Path(tmp) / "out", "-q")
            event(f"exit {built.code}")
            assert validated.code in (0, 2) and built.code == validated.code, (validated, built)
            if built.code == 0:
                _, info = AutoModelForCausalLM.from_pretrained(Path(tmp) / "out", output_loading_info=True)
                assert not info["missing_keys"] and not info["unexpected_keys"]
            else:
                assert one_error_line(validated.err) and one_error_line(built.err), (validated.err, built.err)
                assert not (Path(tmp) / "out").exists()

    check()
