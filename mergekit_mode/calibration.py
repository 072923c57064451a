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
from typing import Optional, TextIO, Union

from mergekit_mode.errors import ModeError
from mergekit_mode.recipe import ExpertData, LoadedRecipe
from mergekit_mode.safety import check_name_lengths, refuse_code

Sequence = list[int]


# A document is tokenized from a prefix of this many characters per token still wanted (plus a
# floor), doubled while the prefix gives too few tokens: memory follows max_tokens, not the file
# (one 72 MB line used to cost 13 GB). Tokens this far before the cut are those of the whole text.
_CHARS_PER_TOKEN = 8
_MIN_CHARS = 4096
_CUT_MARGIN = 16
_SKIP_CHUNK = 2**20  # what is read at a time of a line's unused rest
# A .jsonl record is parsed whole; longer than this it is not a document (use plain text).
_JSONL_RECORD_LIMIT = 16 * 2**20


class _Line:
    """One line of an open text file, read only as far as a tokenizer needs it."""

    def __init__(self, file: TextIO, first: str, path: Path, field: str) -> None:
        self._file, self._path, self._field = file, path, field
        self.complete = first.endswith("\n") or not first
        self._text = first.removesuffix("\n")

    def prefix(self, chars: int) -> tuple[str, bool]:
        """The line's first `chars` characters, and whether that is the whole line."""
        while not self.complete and len(self._text) < chars:
            self._append(chars - len(self._text))
        return self._text[:chars], self.complete and len(self._text) <= chars

    def skip_rest(self) -> None:
        while not self.complete:
            self._text = ""
            self._append(_SKIP_CHUNK)

    def _append(self, chars: int) -> None:
        try:
            chunk = self._file.readline(chars)
        except (UnicodeDecodeError, OSError) as e:
            raise _read_error(e, self._path, self._field) from None
        self.complete = chunk.endswith("\n") or not chunk
        self._text += chunk.removesuffix("\n")


Document = Union[str, _Line]


def iter_documents(path: Path, field: str) -> Iterator[Document]:
    """The documents of a text or .jsonl file, one at a time (empty lines are skipped). A plain-text
    line is handed out unread beyond its first chunk, so a huge line costs what is used of it."""
    jsonl = path.suffix.lower() == ".jsonl"
    check_name_lengths(path, field)
    try:
        with open(path, encoding="utf-8") as f:
            number = 0
            while True:
                number += 1
                first = f.readline(_JSONL_RECORD_LIMIT if jsonl else _MIN_CHARS)
                if not first:
                    return
                if jsonl:
                    if not first.endswith("\n") and len(first) == _JSONL_RECORD_LIMIT:
                        raise ModeError(f"{field}: {path} line {number} is longer than {_JSONL_RECORD_LIMIT // 2**20} "
                                        "MiB; a .jsonl record is read whole: give long documents as plain text")
                    if first.strip():
                        yield _jsonl_text(first, path, number, field)
                    continue
                line = _Line(f, first, path, field)
                if not (line.complete and not first.strip()):
                    yield line
                line.skip_rest()
    except (UnicodeDecodeError, OSError) as e:
        raise _read_error(e, path, field) from None


def _read_error(e: Exception, path: Path, field: str) -> ModeError:
    if isinstance(e, FileNotFoundError):
        return ModeError(f"{field}: {path} does not exist")
    if isinstance(e, UnicodeDecodeError):
        return ModeError(f"{field}: {path} is not UTF-8 text")
    return ModeError(f"{field}: cannot read {path} ({getattr(e, 'strerror', None) or e})")


def _jsonl_text(line: str, path: Path, number: int, field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ModeError(f"{field}: {path} line {number} is not JSON ({e})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ModeError(f"{field}: {path} line {number} has no string field 'text'")
    return text


def _first_tokens(doc: Document, tokenizer, want: int) -> list[int]:
    """The first `want` tokens of a document, tokenizing no more of its text than that takes."""
    chars = _CHARS_PER_TOKEN * want + _MIN_CHARS
    while True:
        text, whole = (doc[:chars], len(doc) <= chars) if isinstance(doc, str) else doc.prefix(chars)
        ids = tokenizer(text)["input_ids"]
        if whole or len(ids) > want + _CUT_MARGIN:
            return ids[:want]
        chars *= 2


def tokenize_documents(docs: Iterator[Document], tokenizer, max_tokens: int, seq_len: int) -> list[Sequence]:
    """Pieces of at most `seq_len` tokens, `max_tokens` in all; stops reading `docs` at the limit."""
    pieces: list[Sequence] = []
    left = max_tokens
    for doc in docs:
        ids = _first_tokens(doc, tokenizer, left)
        pieces += [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
        left -= len(ids)
        if left <= 0:
            break
    return pieces


def load_tokenizer(path: Path, field: str):
    """The folder's tokenizer (transformers' AutoTokenizer), or a ModeError that says who needs it.

    Never runs the folder's code nor asks the model hub: a missing folder is an error here, not a
    repository name to download."""
    from transformers import AutoTokenizer

    check_name_lengths(path, field)
    if not path.is_dir():
        raise ModeError(f"{field}: folder {path} does not exist")
    refuse_code(path, field)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as e:  # whatever a damaged tokenizer file makes transformers, tokenizers or sentencepiece raise
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModeError(f"{field}: cannot load a tokenizer from {path} ({first})") from None


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
