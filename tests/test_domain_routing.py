"""eval --own-weight and --oracle-routing against independent references: the dense oracle model
(base with the expert's MLP) in transformers, the plain MoE where forcing changes nothing, and the
own expert's weight recomputed here from transformers' router logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_mode.domain_routing import forced_choice
from mergekit_mode.toy import write_corpus
from tests.conftest import write_recipe
from tests.test_eval import _windows, moe, reference_perplexity  # noqa: F401 (moe: a fixture)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    return {name: write_corpus(d, root / f"{name}.txt", 1500, seed=7) for name, d in (("a", "prose"), ("c", "code"))}


def _build(run_cli, root, llama, experts, router) -> object:
    out = root / "moe"
    recipe = write_recipe(root / "r.yml", llama.base, experts, names=["a", "b", "c"][:len(experts)], router=router)
    assert run_cli(recipe, out, "-q").code == 0
    return out


def _eval(run_cli, model, texts, *extra):
    data = [arg for name, file in texts.items() for arg in ("--data", f"{name}={file}")]
    result = run_cli("eval", model, *data, "--json", "--ctx", "48", *extra)
    assert result.code == 0, result.err
    return json.loads(result.out)["domains"]


def _dense_oracle(base, expert, out):
    """The base's weights with the expert's MLP tensors in place of the base's (a dense Llama)."""
    shutil.copytree(base, out)
    weights = load_file(base / "model.safetensors")
    mlps = {k: v for k, v in load_file(expert / "model.safetensors").items() if ".mlp." in k}
    save_file({k: mlps.get(k, v) for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_oracle_top1_is_the_dense_oracle_model(llama, moe, texts, run_cli, tmp_path):
    domains = _eval(run_cli, moe, texts, "--oracle-routing", "top1")
    plain = _eval(run_cli, moe, texts)
    for name, expert in (("a", llama.experts[0]), ("c", llama.experts[2])):
        expected, _ = reference_perplexity(_dense_oracle(llama.base, expert, tmp_path / name), texts[name], 48)
        assert domains[name]["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert domains[name]["perplexity"] != pytest.approx(plain[name]["perplexity"], rel=1e-3)
        routing = torch.tensor(domains[name]["routing"])  # what ran: the domain's expert alone
        index = "abc".index(name)
        assert routing[:, index].tolist() == [1.0, 1.0] and routing.sum().item() == 2.0


def test_oracle_topk_with_all_experts_chosen_is_the_plain_moe(llama, texts, run_cli, tmp_path):
    """With k = E the router already chooses every expert: forcing the domain's expert in changes
    nothing, so perplexity equals transformers' own loss of the unforced model."""
    moe = _build(run_cli, tmp_path, llama, llama.experts[:2], {"mode": "noisy", "experts_per_token": 2, "std": 0.5})
    domains = _eval(run_cli, moe, {"a": texts["a"]}, "--oracle-routing", "topk")
    expected, _ = reference_perplexity(moe, texts["a"], 48)
    assert domains["a"]["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_forced_choice_against_a_per_token_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=gen) * 3
    for k in (1, 2, 3):
        for renormalize in (True, False):
            weights, indices = forced_choice(logits, 3, k, renormalize)
            for t in range(len(logits)):
                probs = torch.softmax(logits[t], -1)
                others = sorted((e for e in range(5) if e != 3), key=lambda e: -probs[e].item())[:k - 1]
                chosen = [3, *others]
                expected = probs[chosen] if k > 1 else torch.ones(1)
                if renormalize:
                    expected = expected / expected.sum()
                assert indices[t].tolist() == chosen
                torch.testing.assert_close(weights[t], expected)


def test_own_weight_from_transformers_router_logits(moe, texts, run_cli):
    """Mean weight of the domain's expert and the share of tokens that leave it out, per layer, from
    softmax -> top-2 -> renormalise of transformers' router logits."""
    domains = _eval(run_cli, moe, texts, "--own-weight")
    tokenizer = AutoTokenizer.from_pretrained(moe)
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    for name in texts:
        expert = "abc".index(name)
        own = [[] for _ in range(2)]
        for window in _windows(tokenizer, texts[name], 48):
            with torch.no_grad():
                router_logits = model(window, output_router_logits=True).router_logits
            for layer, logits in enumerate(router_logits):
                top = torch.softmax(logits, -1).topk(2, dim=-1)
                weights = top.values / top.values.sum(-1, keepdim=True)
                own[layer].append((weights * (top.indices == expert)).sum(-1))
        result = domains[name]["own_weight"]
        assert result["expert"] == name
        for layer in range(2):
            w = torch.cat(own[layer])
            assert result["mean"][layer] == pytest.approx(w.mean().item(), rel=1e-5)
            assert result["not_chosen"][layer] == pytest.approx((w == 0).float().mean().item(), rel=1e-5)
            hist = torch.tensor(result["histogram"][layer])
            assert hist.sum().item() == pytest.approx(1.0)
            assert hist[10:].sum().item() == pytest.approx((w >= 0.5).float().mean().item(), abs=1e-6)


def test_own_weight_in_the_table_and_absent_for_unnamed_domains(moe, texts, run_cli):
    result = run_cli("eval", moe, "--data", f"a={texts['a']}", "--data", f"prose={texts['a']}", "--own-weight")
    assert result.code == 0, result.err
    assert "weight of a's own expert (a) per token" in result.out
    assert "own expert" not in result.out.split("routing of prose")[1]
    domains = _eval(run_cli, moe, {"prose": texts["a"]}, "--own-weight")
    assert domains["prose"]["own_weight"] is None


@pytest.mark.parametrize("model, message", [
    ("moe", "no expert is named 'prose'"),
    ("dense", "is not a Mixture-of-Experts model"),
])
def test_oracle_routing_needs_a_named_expert(llama, moe, texts, run_cli, model, message):
    path = moe if model == "moe" else llama.base
    result = run_cli("eval", path, "--data", f"prose={texts['a']}", "--oracle-routing", "top1")
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1
