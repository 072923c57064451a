"""Shared fixtures: tiny models built by the tests themselves, and an in-process CLI runner."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mergekit_mode.cli import main
from mergekit_mode.toy import (DOMAINS, DomainSuite, build_domain_suite, generate, make_expert, make_model,
                               train_tokenizer)


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Run `mergekit-mode ARGS...` in this process; returns exit code and captured output."""

    def run(*args: object) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    texts = [generate(d, 4000, seed=1) for d in DOMAINS]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=512)


@dataclass
class Family:
    """A base and its experts, as folders."""

    base: Path
    experts: list[Path]


def _family(root: Path, tokenizer_dir: Path, arch: str, n: int, **kw) -> Family:
    base = make_model(root / "base", arch, tokenizer_dir=tokenizer_dir, vocab_size=512, **kw)
    experts = [make_expert(base, root / f"expert{i}", seed=i + 1, mlp_scale=0.5) for i in range(n)]
    return Family(base, experts)


@pytest.fixture(scope="session")
def llama(tmp_path_factory, tokenizer_dir) -> Family:
    """Tiny Llama base (rope_theta 5e5, like Llama 3) with 3 experts whose MLPs differ clearly."""
    return _family(tmp_path_factory.mktemp("llama"), tokenizer_dir, "llama", 3, rope_theta=500000.0)


@pytest.fixture(scope="session")
def mistral(tmp_path_factory, tokenizer_dir) -> Family:
    """Tiny Mistral base, sharded, with 4 experts."""
    return _family(tmp_path_factory.mktemp("mistral"), tokenizer_dir, "mistral", 4, max_shard_size="100KB")


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory, tokenizer_dir) -> Family:
    """Tiny Qwen2 base (q/k/v biases, rope_theta 1e6 as Qwen2.5) with 3 experts."""
    return _family(tmp_path_factory.mktemp("qwen2"), tokenizer_dir, "qwen2", 3, rope_theta=1e6)


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory, tokenizer_dir) -> Family:
    """Tiny Qwen3 base (q/k norms, tied embeddings as Qwen3-0.6B) with 3 experts."""
    return _family(tmp_path_factory.mktemp("qwen3"), tokenizer_dir, "qwen3", 3, rope_theta=1e6,
                   tie_word_embeddings=True)


def write_recipe(path: Path, base: Path, experts: list[Path], names: list[str] | None = None, **extra) -> Path:
    specs = [{"model": str(e)} | ({"name": names[i]} if names else {}) for i, e in enumerate(experts)]
    recipe = {"base_model": str(base), "experts": specs, **extra}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`, links not followed: file digests, link targets, folders (what a
    run must leave as it was)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                entries[key] = "link -> " + os.readlink(p)
            elif p.is_dir():
                entries[key] = "folder"
            else:
                entries[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return entries


@pytest.fixture(scope="session")
def domain_suite(tmp_path_factory) -> DomainSuite:
    """Three MLP-only domain experts trained here, one torch thread (about 20 s): experts that are
    better than the base on their domain and worse elsewhere, so a router's quality shows."""
    return build_domain_suite(
        tmp_path_factory.mktemp("suite"), domains=("arithmetic", "dna", "prose"), hidden_size=64,
        intermediate_size=128, num_layers=2, vocab_size=400, n_train_chars=20_000, n_eval_chars=4_000,
        pretrain_steps=50, finetune_steps=50, num_threads=1,
    )


def suite_recipe(path: Path, suite: DomainSuite, **extra) -> Path:
    """A recipe of the suite's experts, each with its training text as router data."""
    experts = [{"name": d, "model": str(p), "data": str(suite.train_texts[d])} for d, p in suite.experts.items()]
    path.write_text(yaml.safe_dump({"base_model": str(suite.base_dir), "experts": experts, **extra}, sort_keys=False))
    return path
