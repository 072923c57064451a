"""toy.markov: the second domain generator (word-level Markov chains) that the held-out fixtures use."""

from __future__ import annotations

import random
from collections import Counter

from mergekit_mode.toy.markov import MarkovSet, make_domains, write_markov_corpus

SPEC = MarkovSet(name="t", domains=("a", "b", "c"), alphabet="abcdefghijkl", word_len=(2, 5), own_words=20,
                 shared_words=10, common_rate=0.2, branching=3, zipf=1.2, line_words=(5, 9), own_letters=5)


def _words(text: str) -> Counter:
    return Counter(w for line in text.splitlines() for w in line.split())


def test_corpus_is_seeded_bounded_and_one_document_per_line(tmp_path):
    one = write_markov_corpus(SPEC, "a", tmp_path / "1.txt", 2_000, seed=3).read_text()
    assert one == write_markov_corpus(SPEC, "a", tmp_path / "2.txt", 2_000, seed=3).read_text()
    assert one != write_markov_corpus(SPEC, "a", tmp_path / "3.txt", 2_000, seed=4).read_text()
    assert 1_500 < len(one) <= 2_001 and one.endswith("\n")
    assert all(5 <= len(line.split()) <= 9 for line in one.splitlines())


def test_domains_have_their_own_words_and_letters(tmp_path):
    domains = make_domains(SPEC)
    shared = set(domains["a"].common)  # every word of the set has a common successor list
    words = {d: set(_words(write_markov_corpus(SPEC, d, tmp_path / f"{d}.txt", 20_000, 0).read_text()))
             for d in SPEC.domains}
    for d in SPEC.domains:
        own = words[d] - set().union(*(words[o] for o in SPEC.domains if o != d))
        assert len(own) >= SPEC.own_words - 2, d  # nearly all its own words occur, and nowhere else
        letters = set("".join(own))
        assert len(letters) <= SPEC.own_letters, (d, letters)
    assert len(shared) == SPEC.shared_words + 3 * SPEC.own_words


def test_reranked_domains_share_successors_at_other_frequencies():
    spec = MarkovSet(name="r", domains=("x", "y"), alphabet=("ka", "to", "ri", "su"), word_len=(1, 3), own_words=0,
                     shared_words=12, common_rate=0.0, branching=3, zipf=1.5, line_words=(5, 9), rerank=True)
    x, y = make_domains(spec).values()
    assert x.successors.keys() == y.successors.keys()
    assert all(set(x.successors[w]) == set(y.successors[w]) == set(x.common[w]) for w in x.successors)
    assert any(x.successors[w] != y.successors[w] for w in x.successors)
    rng = random.Random(0)
    assert x.sample(rng) != x.sample(rng)
