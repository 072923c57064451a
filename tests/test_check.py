"""The quality gate: `mergekit-mode check` and a recipe's `checks:` on experts trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergekit_mode.evaluate import evaluate
from mergekit_mode.toy.train import torch_threads
from tests.conftest import suite_recipe, write_recipe

TRAINED = {"mode": "trained", "experts_per_token": 2, "train": {"steps": 100}}


def _checks(suite, max_ratio: float = 1.05, against: str = "experts") -> dict:
    return {"against": against, "max_ratio": max_ratio, "data": {d: str(p) for d, p in suite.eval_texts.items()}}


def _data(suite) -> list[str]:
    return [arg for d, p in suite.eval_texts.items() for arg in ("--data", f"{d}={p}")]


def _rows(table: str) -> dict[str, list[str]]:
    lines = table.strip().splitlines()
    return {line.split()[0]: line.split() for line in lines[1:-1]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training and evaluation on one torch thread: two spin against each other on a busy 2-core machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained_moe(domain_suite, tmp_path_factory) -> Path:
    """A top-2 router trained on the experts' text, with the gate in its recipe: the build passes it."""
    root = tmp_path_factory.mktemp("trained")
    recipe = suite_recipe(root / "r.yml", domain_suite, router=TRAINED, checks=_checks(domain_suite))
    from mergekit_mode.cli import main

    try:
        main([str(recipe), str(root / "moe"), "-q"])
    except SystemExit as e:
        assert e.code in (0, None)
    return root / "moe"


def test_a_gateless_recipe_that_regresses_fails_its_check_and_leaves_no_output(domain_suite, tmp_path, run_cli):
    recipe = suite_recipe(tmp_path / "r.yml", domain_suite, checks=_checks(domain_suite))
    result = run_cli(recipe, tmp_path / "moe", "-q")
    assert result.code == 1
    rows = _rows(result.out)
    assert set(rows) == set(domain_suite.experts)
    failed = [d for d, row in rows.items() if row[-1] == "FAIL"]
    assert failed and all(float(rows[d][-2]) > 1.05 for d in failed)
    assert all(float(row[-2]) <= 1.05 for d, row in rows.items() if d not in failed)
    assert "check failed: checks[0]: " in result.err and "nothing written" in result.err
    assert not (tmp_path / "moe").exists()
    assert not [p for p in tmp_path.iterdir() if "mergekit-mode" in p.name]  # no staging litter


def test_keep_failed_keeps_the_output_for_inspection(domain_suite, tmp_path, run_cli):
    recipe = suite_recipe(tmp_path / "r.yml", domain_suite, checks=_checks(domain_suite))
    result = run_cli(recipe, tmp_path / "moe", "-q", "--keep-failed")
    assert result.code == 1 and "kept for inspection" in result.err
    assert (tmp_path / "moe" / "config.json").is_file()


def test_a_trained_router_passes_and_check_agrees_with_eval(trained_moe, domain_suite, run_cli):
    result = run_cli("check", trained_moe, *_data(domain_suite), "--max-ratio", "1.05", "--json", "-q")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["passed"] and report["against"] == "experts"
    # the reference of each domain is its own expert, scored as `eval` scores it
    for domain, row in report["domains"].items():
        assert row["reference"] == f"expert {domain}" and row["passed"] and row["ratio"] <= 1.05
        expert = evaluate(domain_suite.experts[domain], {domain: domain_suite.eval_texts[domain]})[domain]
        moe = evaluate(trained_moe, {domain: domain_suite.eval_texts[domain]})[domain]
        assert row["reference_perplexity"] == pytest.approx(expert.perplexity, rel=1e-6)
        assert row["perplexity"] == pytest.approx(moe.perplexity, rel=1e-6)
        assert row["ratio"] == pytest.approx(moe.perplexity / expert.perplexity, rel=1e-6)


def test_check_runs_the_moe_layer_by_layer(trained_moe, domain_suite, run_cli, monkeypatch):
    """The MoE is never loaded whole (E experts in float32 would not fit beside a 7B base); only the
    dense references are."""
    import mergekit_mode.evaluate as evaluate_module

    loaded = []
    real_load = evaluate_module.load_model

    def load_model(path, *args, **kwargs):
        loaded.append(Path(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "load_model", load_model)
    result = run_cli("check", trained_moe, *_data(domain_suite), "--max-ratio", "1.05", "-q")
    assert result.code == 0, result.err
    assert trained_moe not in loaded and sorted(loaded) == sorted(domain_suite.experts.values())


def test_check_marks_failing_rows_and_exits_1(trained_moe, domain_suite, run_cli):
    result = run_cli("check", trained_moe, *_data(domain_suite), "--max-ratio", "0.5", "-q")
    assert result.code == 1 and result.err.startswith("check failed: 3 of 3 domains above 0.5x")
    assert all(row[-1] == "FAIL" for row in _rows(result.out).values())


def test_against_base(trained_moe, domain_suite, run_cli):
    result = run_cli("check", trained_moe, *_data(domain_suite), "--against", "base", "--max-ratio", "100",
                     "--json", "-q")
    assert result.code == 0
    domains = json.loads(result.out)["domains"]
    base = evaluate(domain_suite.base_dir, dict(domain_suite.eval_texts))
    for domain, row in domains.items():
        assert row["reference"] == "base"
        assert row["reference_perplexity"] == pytest.approx(base[domain].perplexity, rel=1e-6)


def test_adapters_are_compared_merged_in_memory(llama, tmp_path, run_cli):
    """The reference of an adapter expert is the base with the adapter merged: peft's own merge,
    saved here by the test and evaluated with `eval`; `check` writes nothing."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergekit_mode.toy import write_corpus
    from mergekit_mode.toy.adapters import make_adapter
    from mergekit_mode.toy.tokenizer import copy_tokenizer

    adapter = make_adapter(llama.base, tmp_path / "lora", seed=2, r=4, lora_alpha=8,
                           target_modules=["gate_proj", "up_proj", "down_proj"])
    spec = {"base_model": str(llama.base), "experts": [{"name": "lora", "adapter": str(adapter)},
                                                        {"name": "full", "model": str(llama.experts[1])}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(spec))
    assert run_cli(tmp_path / "r.yml", tmp_path / "moe", "-q").code == 0
    text = write_corpus("code", tmp_path / "code.txt", 1500, seed=1)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run_cli("check", tmp_path / "moe", "--data", f"lora={text}", "--max-ratio", "10", "--json", "-q")
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama.base), adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    copy_tokenizer(llama.base, tmp_path / "merged")
    expected = evaluate(tmp_path / "merged", {"lora": text})["lora"].perplexity
    assert json.loads(result.out)["domains"]["lora"]["reference_perplexity"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--data", "nope={text}", "--max-ratio", "1.1"], "domain 'nope' is not an expert of the model"),
    (["--data", "expert0={text}", "--max-ratio", "0"], "--max-ratio"),
    (["--data", "expert0={text}", "--max-ratio", "1.1", "--ctx", "1"], "--ctx"),
    (["--data", "expert0=/no/such.txt", "--max-ratio", "1.1"], "does not exist"),
])
def test_user_mistakes_exit_2(llama, tmp_path, run_cli, args, message):
    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts[:2])
    assert run_cli(recipe, tmp_path / "moe", "-q").code == 0
    text = tmp_path / "t.txt"
    text.write_text("12 + 3 = 15 ;\n")
    result = run_cli("check", tmp_path / "moe", *[a.format(text=text) for a in args], "-q")
    assert result.code == 2 and message in result.err and "Traceback" not in result.err


def test_a_folder_not_built_here_is_refused(llama, tmp_path, run_cli):
    result = run_cli("check", llama.base, "--data", f"x={tmp_path}/t.txt", "--max-ratio", "1.1")
    assert result.code == 2 and "mergekit_mode_recipe.yml" in result.err


def test_recipe_checks_are_validated(domain_suite, tmp_path, run_cli):
    checks = _checks(domain_suite)
    checks["data"]["dna"] = str(tmp_path / "missing.txt")
    result = run_cli("validate", suite_recipe(tmp_path / "r.yml", domain_suite, checks=checks))
    assert result.code == 2 and "checks[0].data.dna" in result.err and "does not exist" in result.err
