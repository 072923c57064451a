"""Tests of the toy models, tokenizer, domains and training used across the project."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_mode.toy import (
    DOMAINS,
    build_domain_suite,
    generate,
    make_expert,
    make_model,
    train_tokenizer,
    write_corpus,
)
from mergekit_mode.evaluate import evaluate
from mergekit_mode.toy.train import finetune

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    texts = [generate(d, 20_000, seed=0) for d in DOMAINS]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_tokenizer_loads_and_round_trips(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 400
    for text in [generate(d, 200, seed=5) for d in DOMAINS] + ["Ünïcode 日本 and\ttabs\nnewline"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == 1
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_is_deterministic(tok_dir, tmp_path):
    again = train_tokenizer([generate(d, 20_000, seed=0) for d in DOMAINS], tmp_path, vocab_size=400)
    assert _files(again) == _files(tok_dir)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_make_model_loads_without_missing_keys(arch, shard, tok_dir, tmp_path):
    out = make_model(tmp_path / "m", arch, **TINY, vocab_size=400, tokenizer_dir=tok_dir, max_shard_size=shard)
    assert (out / "model.safetensors.index.json").exists() == (shard is not None)
    assert len(list(out.glob("*.safetensors"))) > (1 if shard else 0)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[arch]
    assert (out / "generation_config.json").exists() and (out / "tokenizer.model").exists()


def test_make_model_options(tmp_path):
    out = make_model(
        tmp_path / "m", "mistral", **TINY, tie_word_embeddings=True, rope_theta=1e6,
        sliding_window=16, dtype=torch.bfloat16,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 16 and config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == 1e6
    tensors = _tensors(out)
    assert "lm_head.weight" not in tensors
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_make_model_rejects_vocab_smaller_than_tokenizer(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="tokenizer size"):
        make_model(tmp_path / "m", **TINY, vocab_size=300, tokenizer_dir=tok_dir)


def test_make_model_and_expert_are_deterministic(tmp_path):
    a = make_model(tmp_path / "a", **TINY, max_shard_size="40KB", seed=3)
    b = make_model(tmp_path / "b", **TINY, max_shard_size="40KB", seed=3)
    assert _files(a) == _files(b)
    assert _files(make_expert(a, tmp_path / "ea", seed=1)) == _files(make_expert(b, tmp_path / "eb", seed=1))
    assert _files(make_expert(a, tmp_path / "ec", seed=2)) != _files(tmp_path / "ea")


def test_make_expert_changes_only_selected_tensors(tmp_path):
    base = make_model(tmp_path / "base", **TINY)
    before = _tensors(base)
    mlp_only = _tensors(make_expert(base, tmp_path / "e1", seed=1))
    with_attn = _tensors(make_expert(base, tmp_path / "e2", seed=1, attn_scale=0.1))
    for name, tensor in before.items():
        is_mlp, is_attn = ".mlp." in name, ".self_attn." in name
        assert torch.equal(mlp_only[name], tensor) != is_mlp, name
        assert torch.equal(with_attn[name], tensor) != (is_mlp or is_attn), name


def test_domains_differ_in_character_statistics():
    hists = {}
    for d in DOMAINS:
        counts = Counter(generate(d, 5_000, seed=0))
        total = sum(counts.values())
        hists[d] = {c: n / total for c, n in counts.items()}
    for i, a in enumerate(DOMAINS):
        for b in DOMAINS[i + 1:]:
            chars = hists[a].keys() | hists[b].keys()
            distance = 0.5 * sum(abs(hists[a].get(c, 0) - hists[b].get(c, 0)) for c in chars)
            assert distance > 0.3, (a, b, distance)  # code vs prose is the closest pair (0.37)


def test_generate_is_seeded_and_bounded(tmp_path):
    for d in DOMAINS:
        text = generate(d, 1_000, seed=7)
        assert text == generate(d, 1_000, seed=7) != generate(d, 1_000, seed=8)
        assert 800 < len(text) <= 1_000 and "\n" in text
    path = write_corpus("dna", tmp_path / "c" / "dna.txt", 500, seed=1)
    assert path.read_text() == generate("dna", 500, seed=1) + "\n"
    with pytest.raises(ValueError):
        generate("poetry", 10, seed=0)


def test_short_finetune_lowers_perplexity(tok_dir, tmp_path):
    base = make_model(tmp_path / "base", **TINY, vocab_size=400, tokenizer_dir=tok_dir)
    text = generate("prose", 8_000, seed=1)
    tuned = finetune(base, tmp_path / "ft", text, 30, ctx=64, lr=1e-2, num_threads=1)
    (tmp_path / "prose.txt").write_text(text)

    def perplexity(model):
        return evaluate(model, {"prose": tmp_path / "prose.txt"}, ctx=64)["prose"].perplexity

    assert perplexity(tuned) < 0.5 * perplexity(base)
    assert (tuned / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    again = finetune(base, tmp_path / "ft2", text, 30, ctx=64, lr=1e-2, num_threads=1)
    assert _files(again) == _files(tuned)


def test_mlp_only_finetune_keeps_everything_else(tok_dir, tmp_path):
    base = make_model(tmp_path / "base", **TINY, vocab_size=400, tokenizer_dir=tok_dir)
    tuned = finetune(base, tmp_path / "ft", generate("code", 3_000, seed=1), 3, mlp_only=True, ctx=64, num_threads=1)
    before, after = _tensors(base), _tensors(tuned)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) != (".mlp." in name), name


def test_lora_finetune_is_deterministic(tok_dir, tmp_path):
    """peft draws each adapter's initial A from torch's global generator: the seed must set it."""
    base = make_model(tmp_path / "base", **TINY, vocab_size=400, tokenizer_dir=tok_dir)
    text, lora = generate("dna", 3_000, seed=1), {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}

    def tune(name: str, seed: int) -> dict[str, bytes]:
        torch.manual_seed(len(name))  # whatever the global generator holds before
        return _files(finetune(base, tmp_path / name, text, 2, lora=lora, ctx=64, num_threads=1, seed=seed))

    assert tune("a", 0) == tune("bb", 0) != tune("c", 1)


def test_build_domain_suite_is_complete_and_deterministic(tmp_path):
    def build(out: Path):
        return build_domain_suite(
            out, hidden_size=32, intermediate_size=64, num_layers=1, vocab_size=400,
            n_train_chars=8_000, n_eval_chars=1_000, pretrain_steps=2, finetune_steps=2, num_threads=1,
        )

    suite = build(tmp_path / "a")
    assert set(suite.experts) == set(suite.eval_texts) == set(DOMAINS)
    for directory in [suite.base_dir, *suite.experts.values()]:
        assert (directory / "model.safetensors").exists() and (directory / "tokenizer.model").exists()
    assert suite.eval_texts["dna"].read_text() != suite.train_texts["dna"].read_text()
    build(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
