"""A second generator of synthetic domains: word-level Markov chains over made-up lexicons.

toy.domains writes four hand-made grammars (equations, code, DNA, prose). Settings tuned on them
need text with other statistics to be checked against, so this generator is built differently:
a domain set (`MarkovSet`) draws a lexicon of pseudo-words from its own alphabet, and every
domain of the set is a first-order Markov chain over its own words plus a pool of words all the
set's domains share. Each step follows either the set's COMMON chain (the same for every domain,
into the shared words) or the domain's OWN chain (its own successors among its own and the shared
words). Each word has a few successors with Zipf-distributed probabilities: what a model must
memorise, and what a domain's expert knows better than the base. A shared word says nothing about
the domain by itself; the words around it do, so a router has to use context (as with real text,
where most tokens are common to every domain).

How far domains lie apart is set by the data: `own_words` / `shared_words`, `common_rate` (how
often a step follows the common chain) and `rerank`: with many own words and a low rate each
domain is a language of its own and an expert is lost elsewhere; with shared words only, reranked
successors (the same words follow, at other frequencies) an expert is only a little worse than
the base elsewhere. Everything is seeded by the set's name and the domain's
name, so the same set always gives the same text; `seed` only picks the samples.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MarkovSet:
    """A family of domains that share an alphabet and some words."""

    name: str
    domains: tuple[str, ...]
    alphabet: str | tuple[str, ...]  # letters (or syllables) the pseudo-words are made of
    word_len: tuple[int, int]  # shortest and longest pseudo-word, in letters (or syllables)
    own_words: int  # words only this domain uses
    shared_words: int  # words every domain of the set uses (each with its own successors)
    common_rate: float  # chance that a step follows the set's common chain rather than the domain's own
    branching: int  # successors per word
    zipf: float  # successor probabilities fall as 1 / rank**zipf
    line_words: tuple[int, int]  # words per line (one line = one document)
    separator: str = " "
    # True: a domain's own chain has the common successors of each word in its own order, so the
    # domains differ in how often a word follows another, not in which words can follow.
    rerank: bool = False
    # >0: each domain's own words use only this many letters of the alphabet (a subset fixed per
    # domain), so its tokens differ from the other domains' as well as its word sequences.
    own_letters: int = 0


def _words(rng: random.Random, alphabet: str | tuple[str, ...], length: tuple[int, int], count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        word = "".join(rng.choices(alphabet, k=rng.randint(*length)))
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


class MarkovDomain:
    """One domain of a set: a word-level Markov chain; sample() gives one document."""

    def __init__(self, spec: MarkovSet, name: str, own: list[str], shared: list[str],
                 common: dict[str, list[str]]) -> None:
        self.spec, self.name = spec, name
        self.common = common
        rng = random.Random(f"{spec.name}:{name}:chain")
        self._cum = list(itertools.accumulate(1.0 / (r + 1) ** spec.zipf for r in range(spec.branching)))
        vocab = own + shared
        self.successors = {w: rng.sample(common[w] if spec.rerank else vocab, spec.branching) for w in vocab}
        self.starts = rng.sample(vocab if spec.rerank else own, spec.branching)

    def _pick(self, rng: random.Random, options: list[str]) -> str:
        cum = self._cum[: len(options)]
        return options[bisect.bisect(cum, rng.random() * cum[-1])]

    def sample(self, rng: random.Random) -> str:
        word = self._pick(rng, self.starts)
        out = [word]
        for _ in range(rng.randint(*self.spec.line_words) - 1):
            table = self.common if rng.random() < self.spec.common_rate else self.successors
            word = self._pick(rng, table[word])
            out.append(word)
        return self.spec.separator.join(out)


def _letters(spec: MarkovSet, domain: str) -> str | tuple[str, ...]:
    if not spec.own_letters:
        return spec.alphabet
    picked = random.Random(f"{spec.name}:{domain}:letters").sample(list(spec.alphabet), spec.own_letters)
    return "".join(picked) if isinstance(spec.alphabet, str) else tuple(picked)


def make_domains(spec: MarkovSet) -> dict[str, MarkovDomain]:
    """The set's domains, each with its own words, the shared pool and the common chain (fixed by
    the set's name)."""
    rng = random.Random(f"{spec.name}:lexicon")
    taken: set[str] = set()
    shared = _words(rng, spec.alphabet, spec.word_len, spec.shared_words, taken)
    own = {d: _words(rng, _letters(spec, d), spec.word_len, spec.own_words, taken) for d in spec.domains}
    common = {w: rng.sample(shared, spec.branching) for w in shared + [w for words in own.values() for w in words]}
    return {d: MarkovDomain(spec, d, own[d], shared, common) for d in spec.domains}


def write_markov_corpus(spec: MarkovSet, domain: str, path: Path, n_chars: int, seed: int) -> Path:
    """About `n_chars` characters of `domain`, one document per line, as UTF-8 text ending in a newline."""
    source = make_domains(spec)[domain]
    rng = random.Random(f"{spec.name}:{domain}:{seed}")
    lines: list[str] = []
    used = -1
    while True:
        line = source.sample(rng)
        if lines and used + 1 + len(line) > n_chars:
            break
        lines.append(line)
        used += 1 + len(line)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
