"""Synthetic text domains for tiny domain experts.

Each domain is produced by a small generator so that tests, the demo and the benchmarks need
no downloaded data. The four domains differ sharply in character and token statistics (digits
and operators; identifiers and punctuation; a four-letter alphabet; lower-case words), so a
router has something to find, and each has enough regular structure that a 2-4 layer model
learns it in seconds. The grammar of a domain is fixed; ``seed`` only picks the samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

DOMAINS: tuple[str, ...] = ("arithmetic", "code", "dna", "prose")


def _arithmetic(rng: random.Random) -> str:
    """A few equations with true results, e.g. ``17 + 25 = 42 ; 9 * 3 = 27 ;``."""
    parts = []
    for _ in range(rng.randint(3, 5)):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            result = a * b
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            result = a + b if op == "+" else a - b
        parts.append(f"{a} {op} {b} = {result} ;")
    return " ".join(parts)


_NAMES = ("x", "y", "n", "total", "count", "value", "item", "acc")
_FUNCS = ("add", "scale", "clip", "step", "norm", "mix")


def _code(rng: random.Random) -> str:
    """Two or three one-line Python statements drawn from a handful of templates."""
    def statement() -> str:
        a, b = rng.sample(_NAMES, 2)
        k, n = rng.randint(1, 9), rng.randint(2, 20)
        op = rng.choice(("+", "-", "*"))
        templates = (
            f"def {rng.choice(_FUNCS)}({a}, {b}): return {a} {op} {b}",
            f"for {a} in range({n}): print({a} {op} {k})",
            f"if {a} > {n}: {a} = {a} - {k}",
            f"{a} = [{b} * {k} for {b} in range({n})]",
            f"while {a} < {n}: {a} += {k}",
            f"{a} = {rng.choice(_FUNCS)}({b}, {k})",
        )
        return rng.choice(templates)

    return "; ".join(statement() for _ in range(rng.randint(2, 3)))


# Motifs are fixed (seeded by a constant) so that every sample of the domain shares them.
_DNA_MOTIFS: tuple[str, ...] = tuple(
    "".join(random.Random(f"dna-motif-{i}").choices("ACGT", k=6 + i % 5)) for i in range(8)
)


def _dna(rng: random.Random) -> str:
    """A run of fixed motifs with rare point mutations: a four-letter alphabet, no spaces."""
    out = []
    while sum(map(len, out)) < 60:
        motif = list(rng.choice(_DNA_MOTIFS))
        if rng.random() < 0.2:
            motif[rng.randrange(len(motif))] = rng.choice("ACGT")
        out.append("".join(motif))
    return "".join(out)


_DET = ("the", "a", "every", "some")
_ADJ = ("old", "small", "quiet", "green", "bright", "tired", "brave", "cold")
_NOUN = ("cat", "river", "farmer", "house", "bird", "garden", "road", "child", "boat", "king", "tree", "stone")
_VERB = ("sees", "follows", "finds", "leaves", "watches", "paints", "carries", "hears")
_PREP = ("near", "behind", "under", "beyond")


def _associations(seed: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    """Fixed per-noun adjectives, verbs and objects: facts a model must memorise.

    Uniformly random word choices would leave nothing to learn beyond the grammar, and a
    briefly pretrained base would already sit at the entropy floor; these associations give
    the domain's expert (its MLPs in particular) something the base knows only in part.
    """
    rng = random.Random(seed)
    return {
        noun: (tuple(rng.sample(_ADJ, 2)), tuple(rng.sample(_VERB, 2)), tuple(rng.sample(_NOUN, 3)))
        for noun in _NOUN
    }


_PROSE_FACTS = _associations("prose-facts")


def _prose(rng: random.Random) -> str:
    """Two or three sentences from a small English-like grammar with fixed associations."""
    def noun_phrase(noun: str) -> str:
        words = [rng.choice(_DET)]
        if rng.random() < 0.5:
            words.append(rng.choice(_PROSE_FACTS[noun][0]))
        return " ".join(words + [noun])

    def sentence() -> str:
        subject = rng.choice(_NOUN)
        _, verbs, objects = _PROSE_FACTS[subject]
        obj = rng.choice(objects)
        s = f"{noun_phrase(subject)} {rng.choice(verbs)} {noun_phrase(obj)}"
        if rng.random() < 0.4:
            s += f" {rng.choice(_PREP)} {noun_phrase(rng.choice(_PROSE_FACTS[obj][2]))}"
        return s + " ."

    return " ".join(sentence() for _ in range(rng.randint(2, 3)))


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic,
    "code": _code,
    "dna": _dna,
    "prose": _prose,
}


def sample_lines(domain: str, n_chars: int, seed: int) -> list[str]:
    """Whole samples (lines) of ``domain`` whose joined length stays within ``n_chars``.

    At least one line is returned, so a tiny ``n_chars`` still yields a usable sample.
    """
    if domain not in _GENERATORS:
        raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
    rng = random.Random(f"{domain}:{seed}")  # str seeds hash stably across processes
    lines: list[str] = []
    used = -1  # no newline before the first line
    while True:
        line = _GENERATORS[domain](rng)
        if lines and used + 1 + len(line) > n_chars:
            return lines
        lines.append(line)
        used += 1 + len(line)


def generate(domain: str, n_chars: int, seed: int) -> str:
    """About ``n_chars`` characters of ``domain``, one sample per line (no trailing newline)."""
    return "\n".join(sample_lines(domain, n_chars, seed))


def write_corpus(domain: str, path: Path, n_chars: int, seed: int) -> Path:
    """Write :func:`generate` output to ``path`` as UTF-8 text ending in a newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generate(domain, n_chars, seed) + "\n", encoding="utf-8")
    return path
