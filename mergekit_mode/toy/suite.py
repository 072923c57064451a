"""One call that builds a base model and one trained expert per synthetic domain.

This is what the demo and the benchmarks need: a tokenizer, a base pretrained on the mix of
all domains, an expert fine-tuned on each domain, and held-out text to measure them on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .domains import DOMAINS, write_corpus
from .models import make_model
from .tokenizer import train_tokenizer
from .train import finetune, pretrain

# Held-out text uses seeds far from the training seeds, so it never repeats training samples.
EVAL_SEED_OFFSET = 10_000

# (domain, path, n_chars, seed) -> path: writes a domain's text, one document per line.
CorpusWriter = Callable[[str, Path, int, int], Path]


@dataclass(frozen=True)
class DomainSuite:
    """Paths of a built suite; every model folder carries the tokenizer files."""

    tokenizer_dir: Path
    base_dir: Path
    experts: dict[str, Path]
    train_texts: dict[str, Path]
    eval_texts: dict[str, Path]


def build_domain_suite(
    out_dir: Path,
    *,
    domains: tuple[str, ...] = DOMAINS,
    arch: str = "llama",
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 4,
    vocab_size: int = 512,
    n_train_chars: int = 60_000,
    n_eval_chars: int = 20_000,
    pretrain_steps: int = 150,
    finetune_steps: int = 150,
    pretrain_lr: float = 3e-3,
    finetune_lr: float = 5e-3,
    mlp_only: bool = True,
    seed: int = 0,
    num_threads: int | None = None,
    write: CorpusWriter = write_corpus,
) -> DomainSuite:
    """Build ``out_dir/{tokenizer,base,experts/<domain>,data/...}`` and return their paths.

    ``mlp_only`` (default) fine-tunes only the MLPs, so the experts share the base's attention
    as a Mixture-of-Domain-Experts assumes; with full fine-tunes the attention drifts and no
    router can recover the expert's own quality (see the project's CONTEXT notes). ``write`` makes
    the text (default: toy.domains' grammars; toy.markov gives other domain sets).
    """
    out_dir = Path(out_dir)
    train_texts = {d: write(d, out_dir / "data" / "train" / f"{d}.txt", n_train_chars, seed) for d in domains}
    eval_texts = {
        d: write(d, out_dir / "data" / "eval" / f"{d}.txt", n_eval_chars, seed + EVAL_SEED_OFFSET)
        for d in domains
    }
    texts = {d: p.read_text(encoding="utf-8") for d, p in train_texts.items()}
    tokenizer_dir = train_tokenizer(texts.values(), out_dir / "tokenizer", vocab_size=vocab_size)
    base_dir = make_model(
        out_dir / "base",
        arch,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        seed=seed,
        tokenizer_dir=tokenizer_dir,
    )
    pretrain(base_dir, texts, pretrain_steps, lr=pretrain_lr, seed=seed, num_threads=num_threads)
    experts = {
        d: finetune(
            base_dir, out_dir / "experts" / d, texts[d], finetune_steps,
            mlp_only=mlp_only, lr=finetune_lr, seed=seed, num_threads=num_threads,
        )
        for d in domains
    }
    return DomainSuite(tokenizer_dir, base_dir, experts, train_texts, eval_texts)
