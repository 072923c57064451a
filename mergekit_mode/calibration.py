"""The experts' domain text, read and tokenized for the routers made from data and for `eval`.

Data files can be far larger than what a router needs, so they are read lazily, line by line,
and reading stops as soon as the token limit is reached: the first `max_tokens` tokens of a file
are used, which is deterministic and costs time and memory in proportion to the limit, not to the
file. A plain-text file holds one document per line; a `.jsonl` file one JSON record per line
with the document in its `text` field. Every document is tokenized on its own (with the
tokenizer's BOS), as a model sees a fresh text, and cut into pieces of at most `seq_len` tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergekit_mode.errors import ModeError
from mergekit_mode.recipe import ExpertData, LoadedRecipe

Sequence = list[int]


def iter_documents(path: Path, field: str) -> Iterator[str]:
    """The documents of a text or .jsonl file, one at a time (empty lines are skipped)."""
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                yield _jsonl_text(line, path, number, field) if jsonl else line.rstrip("\n")
    except FileNotFoundError:
        raise ModeError(f"{field}: {path} does not exist") from None
    except UnicodeDecodeError:
        raise ModeError(f"{field}: {path} is not UTF-8 text") from None
    except OSError as e:
        raise ModeError(f"{field}: cannot read {path} ({e.strerror})") from None


def _jsonl_text(line: str, path: Path, number: int, field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ModeError(f"{field}: {path} line {number} is not JSON ({e})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ModeError(f"{field}: {path} line {number} has no string field 'text'")
    return text


def tokenize_documents(docs: Iterator[str], tokenizer, max_tokens: int, seq_len: int) -> list[Sequence]:
    """Pieces of at most `seq_len` tokens, `max_tokens` in all; stops reading `docs` at the limit."""
    pieces: list[Sequence] = []
    left = max_tokens
    for doc in docs:
        ids = tokenizer(doc)["input_ids"][:left]
        pieces += [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
        left -= len(ids)
        if left <= 0:
            break
    return pieces


def load_tokenizer(path: Path, field: str):
    """The folder's tokenizer (transformers' AutoTokenizer), or a ModeError that says who needs it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModeError(f"{field}: cannot load a tokenizer from {path} ({str(e).splitlines()[0]})") from None


@dataclass(frozen=True)
class ExpertTexts:
    """One expert's token pieces: for fitting, for the held-out report, and its negatives."""

    train: list[Sequence]
    held_out: list[Sequence]
    negative: list[Sequence]


def expert_pieces(
    loaded: LoadedRecipe, index: int, spec: ExpertData, tokenizer, max_tokens: int, seq_len: int
) -> list[Sequence]:
    """An expert's prompts, then its data file, within its token limit."""
    docs: list[Iterator[str]] = [iter(spec.prompts or [])]
    if spec.data is not None:
        docs.append(iter_documents(loaded.resolve(spec.data), f"experts[{index}].data"))
    chained = (doc for source in docs for doc in source)
    pieces = tokenize_documents(chained, tokenizer, spec.max_tokens or max_tokens, seq_len)
    if not pieces:
        raise ModeError(f"experts[{index}].data: no text (the file has only empty lines)")
    return pieces


def split_held_out(pieces: list[Sequence], share: float, seed: str) -> tuple[list[Sequence], list[Sequence]]:
    """A seeded shuffle, then the last `share` of the pieces (at least one train piece is kept)."""
    order = list(range(len(pieces)))
    random.Random(seed).shuffle(order)
    n_held = min(int(round(share * len(pieces))), len(pieces) - 1)
    cut = len(pieces) - n_held
    return [pieces[i] for i in order[:cut]], [pieces[i] for i in order[cut:]]


def load_calibration(loaded: LoadedRecipe, tokenizer, held_out: float = 0.0) -> list[ExpertTexts]:
    """Every expert's texts, tokenized with the base's tokenizer, in expert order."""
    router = loaded.recipe.router
    out = []
    for i, (spec, name) in enumerate(zip(loaded.recipe.experts, loaded.recipe.expert_names)):
        pieces = expert_pieces(loaded, i, spec, tokenizer, router.max_tokens, router.seq_len)
        # seeded by the expert's name, not its place: an edit that adds or drops another expert
        # leaves this one's pieces, and so its hidden row, as they were
        train, held = split_held_out(pieces, held_out, f"{router.seed}:{name}")
        negative = _prompt_pieces(spec.negative_prompts, tokenizer, router.seq_len)
        out.append(ExpertTexts(train, held, negative))
    return out


def _prompt_pieces(prompts: Optional[list[str]], tokenizer, seq_len: int) -> list[Sequence]:
    return [tokenizer(p)["input_ids"][:seq_len] for p in prompts or []]
