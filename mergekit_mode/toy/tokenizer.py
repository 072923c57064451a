"""An offline sentencepiece tokenizer laid out like a Hugging Face Llama model folder.

Why sentencepiece and not a tokenizers BPE: llama.cpp's ``convert_hf_to_gguf.py`` reads
``tokenizer.model`` first for Llama, Mistral and their MoE outputs, while a byte-level BPE ``tokenizer.json``
is identified by a hash of its pre-tokenizer and an unknown hash is rejected. The trainer
options mirror Llama's own tokenizer (BPE, byte fallback, digits split, identity
normalisation), so the same files load in transformers, llama.cpp and vLLM.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# What copy_tokenizer carries over; train_tokenizer writes all but tokenizer.json, which a
# tokenizer folder from elsewhere (a real model's) may hold.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
)

# Fixed special ids the rest of the project relies on (Llama's convention).
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a BPE sentencepiece model on ``texts`` and write the HF tokenizer files to ``out_dir``.

    ``vocab_size`` includes the 3 special and 256 byte-fallback pieces, so it must exceed 259
    plus the number of distinct characters. Training is single-threaded over the texts in
    the given order, which makes the written bytes identical for identical inputs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("train_tokenizer needs at least one non-empty line of text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK})
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
        },
    )
    return out_dir


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> None:
    """Copy the tokenizer files that exist in ``src_dir`` into ``dst_dir``."""
    for name in TOKENIZER_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            (Path(dst_dir) / name).write_bytes(src.read_bytes())


def tokenizer_size(tokenizer_dir: Path) -> int:
    """Number of tokens of the folder's tokenizer (the smallest valid vocab_size): the pieces of its
    ``tokenizer.model``, or of its ``tokenizer.json`` with added tokens for a BPE tokenizer (the
    one Qwen models need to reach llama.cpp)."""
    model = Path(tokenizer_dir) / "tokenizer.model"
    if model.is_file():
        return spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
