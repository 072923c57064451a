"""Tiny models, tokenizers and synthetic domain data for tests, the demo and benchmarks.

Everything here is built locally and deterministically from seeds: no model hub is needed.
"""

from .domains import DOMAINS, generate, write_corpus
from .models import make_config, make_expert, make_model
from .tokenizer import train_tokenizer

__all__ = [
    "DOMAINS",
    "generate",
    "make_config",
    "make_expert",
    "make_model",
    "train_tokenizer",
    "write_corpus",
]
