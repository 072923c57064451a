"""`mergekit-mode eval` and `report`: perplexity against transformers' own loss, routing shares, plots."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_mode.toy import write_corpus
from tests.conftest import write_recipe


def reference_perplexity(model_dir, text_file, ctx: int) -> tuple[float, int]:
    """Documents tokenized one by one (with BOS), joined, cut into windows of ctx; each window's
    mean loss from transformers, weighted by the tokens it scores."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, scored = 0.0, 0
    for window in _windows(tokenizer, text_file, ctx):
        with torch.no_grad():
            loss = model(window, labels=window).loss.item()
        total += loss * (window.numel() - window.shape[0])  # each row scores all but its first token
        scored += window.numel() - window.shape[0]
    return math.exp(total / scored), scored


def _windows(tokenizer, text_file, ctx: int) -> list[torch.Tensor]:
    """The full windows as one [n, ctx] batch, and the shorter last window on its own."""
    ids = [t for line in text_file.read_text().splitlines() if line.strip() for t in tokenizer(line)["input_ids"]]
    full = len(ids) // ctx * ctx
    batches = [torch.tensor(ids[:full]).reshape(-1, ctx)]
    return batches + ([torch.tensor([ids[full:]])] if len(ids) - full >= 2 else [])


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    return {d: write_corpus(d, root / f"{d}.txt", 1200, seed=4) for d in ("arithmetic", "prose")}


@pytest.fixture(scope="module")
def moe(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "out"
    recipe = write_recipe(out.parent / "r.yml", llama.base, llama.experts, names=["a", "b", "c"],
                          router={"mode": "noisy", "experts_per_token": 2, "std": 0.5})
    from mergekit_mode.cli import main

    main([str(recipe), str(out), "-q"])
    return out


def _eval(run_cli, model, texts, *extra):
    data = [arg for name, file in texts.items() for arg in ("--data", f"{name}={file}")]
    result = run_cli("eval", model, *data, "--json", *extra)
    assert result.code == 0, result.err
    return json.loads(result.out)["domains"]


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_perplexity_equals_exp_of_transformers_loss(llama, moe, texts, run_cli, which):
    model = llama.base if which == "dense" else moe
    domains = _eval(run_cli, model, texts, "--ctx", "37", "--batch-size", "3")
    for name, file in texts.items():
        expected, scored = reference_perplexity(model, file, 37)
        assert domains[name]["tokens"] == scored
        assert domains[name]["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert (domains[name]["routing"] is None) == (which == "dense")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_layer_streamed_eval_of_qwen_bases_and_moes_equals_transformers_loss(request, texts, run_cli, tmp_path,
                                                                              family):
    """eval runs the Qwen formats layer by layer (Qwen2's q/k/v biases and shared expert with its gate,
    Qwen3's q/k norms and rescaled top-k): the same perplexity as their transformers classes."""
    fam = request.getfixturevalue(family)
    extra = {"shared_expert": "base"} if family == "qwen2" else {}
    recipe = write_recipe(tmp_path / "r.yml", fam.base, fam.experts, names=["a", "b", "c"],
                          router={"mode": "noisy", "experts_per_token": 2, "std": 0.5}, **extra)
    assert run_cli(recipe, tmp_path / "out", "-q").code == 0
    for model in (fam.base, tmp_path / "out"):
        domains = _eval(run_cli, model, texts, "--ctx", "37", "--batch-size", "3")
        for name, file in texts.items():
            expected, scored = reference_perplexity(model, file, 37)
            assert domains[name]["tokens"] == scored
            assert domains[name]["perplexity"] == pytest.approx(expected, rel=1e-5)
            assert (domains[name]["routing"] is None) == (model == fam.base)


def test_routing_shares_count_top_k_choices(moe, texts, run_cli):
    """Each expert's share of the tokens that pick it among their top 2, counted here from transformers'
    router logits; every layer sums to k = 2."""
    domains = _eval(run_cli, moe, texts, "--ctx", "64")
    tokenizer = AutoTokenizer.from_pretrained(moe)
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    counts = torch.zeros(2, 3)
    for window in _windows(tokenizer, texts["prose"], 64):
        with torch.no_grad():
            logits = model(window, output_router_logits=True).router_logits
        for layer, layer_logits in enumerate(logits):
            counts[layer] += torch.bincount(layer_logits.topk(2, dim=-1).indices.flatten(), minlength=3)
    routing = torch.tensor(domains["prose"]["routing"])
    torch.testing.assert_close(routing.sum(-1), torch.full((2,), 2.0))
    torch.testing.assert_close(routing, counts / (counts.sum(-1, keepdim=True) / 2))


def test_report_prints_the_table_and_writes_a_heatmap(moe, texts, run_cli, tmp_path):
    data = [arg for name, file in texts.items() for arg in ("--data", f"{name}={file}")]
    result = run_cli("report", moe, *data, "--plot", tmp_path / "routing.png")
    assert result.code == 0, result.err
    assert "routing of prose" in result.out and "perplexity" in result.out
    assert result.out.splitlines()[0].split() == ["domain", "tokens", "perplexity"]
    assert "a" in result.out.split("routing of arithmetic")[1].splitlines()[1].split()  # recipe's expert names
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_dense_model_is_a_user_error(llama, texts, run_cli, tmp_path):
    result = run_cli("report", llama.base, "--data", f"prose={texts['prose']}", "--plot", tmp_path / "p.png")
    assert result.code == 2
    assert "not a mixture of experts" in result.err


@pytest.mark.parametrize("arg, message", [
    ("prose", "is not NAME=FILE"),
    ("prose=/nonexistent.txt", "/nonexistent.txt does not exist"),
])
def test_bad_data_option_is_a_one_line_error(llama, run_cli, arg, message):
    result = run_cli("eval", llama.base, "--data", arg)
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_progress_bar_ends_at_its_total(llama, moe, texts, run_cli, which, monkeypatch):
    """The bar counts whole tokens and ends at its total. The layer-streamed eval advances it by
    shares of each group's work: added as floats, they summed past the total on a 30-layer model,
    and tqdm warned ("clamping frac") with a negative time left."""
    import tqdm as tqdm_module

    ends = []
    real_close = tqdm_module.tqdm.close

    def close(bar):
        if bar.desc.startswith("eval"):
            ends.append((bar.n, bar.total))
        real_close(bar)

    monkeypatch.setattr(tqdm_module.tqdm, "close", close)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tqdm_module.TqdmWarning)
        domains = _eval(run_cli, llama.base if which == "dense" else moe, texts, "--ctx", "37", "--batch-size", "3")
    assert domains and ends and all(type(n) is int and n == total for n, total in ends), ends
