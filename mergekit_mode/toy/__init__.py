"""Tiny models, tokenizers and synthetic domain data for tests, the demo and benchmarks.

Everything here is built locally and deterministically from seeds: no model hub is needed.
"""

from .domains import DOMAINS, generate, write_corpus
from .models import make_expert, make_model
from .suite import DomainSuite, build_domain_suite
from .tokenizer import train_tokenizer
from .train import finetune, pretrain

__all__ = [
    "DOMAINS",
    "DomainSuite",
    "build_domain_suite",
    "finetune",
    "generate",
    "make_expert",
    "make_model",
    "pretrain",
    "train_tokenizer",
    "write_corpus",
]
