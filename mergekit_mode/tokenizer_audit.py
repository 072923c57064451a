"""The tokenizer, chat template and generation settings of the base and every expert, compared.

A Mixture of Domain Experts reads text with one tokenizer, so an expert whose tokenizer gives a
token another id (or has tokens the base lacks, or starts documents with another BOS) would have
its MLP fed ids it was never trained on: that is refused, naming both files. Chat templates,
eos/pad tokens and generation settings are only settings: they may differ, and the recipe's
`chat_template:` and `generation_config:` say which folder's the output carries (default: the
base's, with a warning when an expert's differ and the recipe did not choose).

Everything is read from the files themselves (tokenizer.json, tokenizer.model through
sentencepiece's parser, vocab.json, tokenizer_config.json, ...): no tokenizer class is built and no
code runs. The output never pads with BOS: a chosen tokenizer or generation config whose pad token
is its BOS token is carried with pad unset (mergekit saves its tokenizers with pad set to BOS).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from mergekit_mode.errors import ModeError
from mergekit_mode.inputs import check_tokenizer, read_json
from mergekit_mode.recipe import FromExpert, LoadedRecipe, RESERVED_NAME
from mergekit_mode.safety import check_regular_inside, read_small_file

# Files that define the token ids (a folder may carry several forms of the same vocabulary).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
# Files that hold the tokenizer's settings: special tokens and the chat template.
SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
GENERATION_FILE = "generation_config.json"
# Special tokens whose id every expert must share (BOS starts every document, UNK replaces what
# the vocabulary lacks); eos and pad are settings.
_ID_TOKENS = ("bos_token", "unk_token")
_SETTINGS = ("chat_template", "eos_token", "pad_token")

Content = Union[Path, bytes]  # a file copied as it is, or rewritten content


@dataclass(frozen=True)
class Tokenizer:
    """What one folder's files say about its tokenizer."""

    where: str  # the recipe field, for messages
    folder: Path
    vocab: dict[str, int]  # token -> id: the main vocabulary plus added tokens
    source: dict[str, Path]  # token -> the file that gives it
    vocab_file: Optional[Path]  # the main vocabulary file (None: only added tokens are known)
    special: dict[str, Optional[str]]  # bos_token, eos_token, pad_token, unk_token as strings
    special_source: dict[str, Path]  # the file each of them comes from
    chat_template: object  # str, a list of named templates, or None

    @property
    def has_vocab(self) -> bool:
        return self.vocab_file is not None

    def file(self, token: str) -> Path:
        """The file that gives `token`, or would (the main vocabulary file) when it lacks it."""
        return self.source.get(token, self.vocab_file or self.folder)

    @property
    def settings_files(self) -> list[str]:
        return [name for name in SETTINGS_FILES if (self.folder / name).is_file()]


def _token_text(value: object) -> Optional[str]:
    """A special token as saved: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _main_vocab(folder: Path, where: str) -> tuple[dict[str, int], Optional[Path]]:
    """The folder's main vocabulary, from the first of tokenizer.json, tokenizer.model, vocab.json."""
    fast = folder / "tokenizer.json"
    if fast.is_file():
        model = read_json(fast, where).get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
            return {str(k): int(v) for k, v in vocab.items()}, fast
        if isinstance(vocab, list):  # Unigram: [piece, score] in id order
            return {str(entry[0]): i for i, entry in enumerate(vocab)}, fast
        raise ModeError(f"{where}: {fast} has no model.vocab (an unknown tokenizer model)")
    spm_file = folder / "tokenizer.model"
    if spm_file.is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))  # check_tokenizer loaded it once
        return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}, spm_file
    vocab_json = folder / "vocab.json"
    if vocab_json.is_file():
        return {str(k): int(v) for k, v in read_json(vocab_json, where).items()}, vocab_json
    return {}, None


def _added_tokens(folder: Path, where: str, config: dict) -> Iterator[tuple[str, int, Path]]:
    fast = folder / "tokenizer.json"
    if fast.is_file():
        for token in read_json(fast, where).get("added_tokens") or []:
            yield str(token["content"]), int(token["id"]), fast
    for id_, token in (config.get("added_tokens_decoder") or {}).items():
        yield str(_token_text(token)), int(id_), folder / "tokenizer_config.json"
    added = folder / "added_tokens.json"
    if added.is_file():
        for content, id_ in read_json(added, where).items():
            yield str(content), int(id_), added


def _chat_template(folder: Path, where: str, config: dict) -> object:
    """As transformers finds it: chat_template.jinja, then chat_template.json, then tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return read_small_file(jinja).decode("utf-8")
        except UnicodeDecodeError:
            raise ModeError(f"{where}: {jinja} is not UTF-8 text") from None
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        return read_json(as_json, where).get("chat_template")
    return config.get("chat_template")


def _check_own(folder: Path, names: tuple[str, ...], where: str) -> None:
    """Each of these files that the folder has is its own regular file: no link points us elsewhere."""
    for name in names:
        if os.path.lexists(folder / name):
            check_regular_inside(folder / name, folder, where)


def read_tokenizer(folder: Path, where: str) -> Optional[Tokenizer]:
    """The folder's tokenizer as its files state it; None when it carries no tokenizer files."""
    if not any((folder / name).is_file() for name in VOCAB_FILES + SETTINGS_FILES):
        return None
    _check_own(folder, VOCAB_FILES + SETTINGS_FILES, where)
    check_tokenizer(folder, where)  # each file parses with the library that reads it
    config_file = folder / "tokenizer_config.json"
    config = read_json(config_file, where) if config_file.is_file() else {}
    map_file = folder / "special_tokens_map.json"
    special_map = read_json(map_file, where) if map_file.is_file() else {}
    try:
        vocab, main = _main_vocab(folder, where)
        source = {token: main for token in vocab} if main else {}
        for content, id_, file in _added_tokens(folder, where, config):
            vocab[content], source[content] = id_, file
    except (KeyError, TypeError, ValueError) as e:
        raise ModeError(f"{where}: {folder} has a malformed tokenizer file ({e!r})") from None
    # special_tokens_map.json wins over tokenizer_config.json, as transformers loads them
    special, special_source = {}, {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        file, settings = (map_file, special_map) if key in special_map else (config_file, config)
        special[key], special_source[key] = _token_text(settings.get(key)), file
    return Tokenizer(where, folder, vocab, source, main, special, special_source,
                     _chat_template(folder, where, config))


_MISMATCH = "the MoE reads text with one tokenizer, so this expert's MLP would see other token ids than it was trained on"


def check_same_ids(base: Tokenizer, expert: Tokenizer) -> None:
    """Refuse an expert whose token ids differ from the base's, naming both files."""
    for token, id_ in expert.vocab.items():
        if base.vocab.get(token) != id_ and (base.has_vocab or token in base.vocab):
            theirs = f"gives it id {base.vocab[token]}" if token in base.vocab else "lacks it"
            raise ModeError(f"{expert.where}: {expert.file(token)} gives {token!r} id {id_}; {base.where}'s "
                            f"{base.file(token)} {theirs}: {_MISMATCH}")
    if expert.has_vocab:
        for token, id_ in base.vocab.items():
            if token not in expert.vocab:
                raise ModeError(f"{expert.where}: {base.where}'s {base.file(token)} has {token!r} (id {id_}), which "
                                f"{expert.folder}'s tokenizer files lack: {_MISMATCH}")
    for key in _ID_TOKENS:
        mine, theirs = expert.special[key], base.special[key]
        if mine is not None and theirs is not None and mine != theirs:
            raise ModeError(f"{expert.where}: {expert.special_source[key]} sets {key} {mine!r}, "
                            f"{base.where}'s {base.special_source[key]} {theirs!r}: {_MISMATCH}")


def _settings_differ(base: Tokenizer, expert: Tokenizer) -> list[str]:
    if not expert.settings_files:
        return []
    values = {"chat_template": (base.chat_template, expert.chat_template),
              "eos_token": (base.special["eos_token"], expert.special["eos_token"]),
              "pad_token": (base.special["pad_token"], expert.special["pad_token"])}
    return [key.replace("_", " ") for key in _SETTINGS if values[key][0] != values[key][1]]


def _generation(folder: Optional[Path], where: str) -> Optional[dict]:
    if folder is None or not (folder / GENERATION_FILE).is_file():
        return None
    _check_own(folder, (GENERATION_FILE,), where)
    config = read_json(folder / GENERATION_FILE, where)
    config.pop("transformers_version", None)  # written by whichever transformers saved it
    return config


@dataclass(frozen=True)
class Carried:
    """The files besides the weights that the output carries, and where each came from."""

    files: tuple[tuple[str, Content], ...]  # output file name -> source file or rewritten content
    chat_template: str  # `base_model` or the expert whose tokenizer settings were taken
    generation_config: Optional[str]  # the same for generation_config.json; None when there is none
    notes: tuple[str, ...]  # what the card says besides the choice (e.g. a pad token left unset)
    folders: tuple[tuple[Path, str], ...] = ()  # the folders the files come from, with their recipe field

    def card_text(self) -> str:
        who = {RESERVED_NAME: "the base model's"}
        template = who.get(self.chat_template, f"expert `{self.chat_template}`'s")
        generation = ("none" if self.generation_config is None
                      else who.get(self.generation_config, f"expert `{self.generation_config}`'s"))
        lines = [f"- Tokenizer: every expert's token ids equal the base's (checked); chat template and special "
                 f"tokens: {template} (recipe `chat_template`); generation config: {generation} (recipe "
                 "`generation_config`)."]
        return "\n".join(lines + [f"- {note}" for note in self.notes])


@dataclass(frozen=True)
class _Folders:
    """The folders of one expert that may hold its tokenizer and generation settings."""

    name: str
    tokenizer: Optional[Tokenizer]
    generation_folder: Optional[Path]
    generation_where: str


def _expert_folders(loaded: LoadedRecipe) -> Iterator[_Folders]:
    """An adapter folder's own tokenizer files come first (it was trained with them), then its model's."""
    for i, (spec, name) in enumerate(zip(loaded.recipe.experts, loaded.recipe.expert_names)):
        candidates = [(loaded.resolve(p), f"experts[{i}].{key}") for key, p in (("adapter", spec.adapter),
                                                                              ("model", spec.model)) if p is not None]
        tokenizer = next((t for folder, where in candidates if (t := read_tokenizer(folder, where))), None)
        generation = next(((folder, where) for folder, where in candidates if (folder / GENERATION_FILE).is_file()),
                          (None, ""))
        yield _Folders(name, tokenizer, *generation)


def _unpadded_json(file: Path, key: str) -> bytes:
    """The file without its pad setting: null in tokenizer_config.json (transformers' "unset"), absent elsewhere."""
    data = json.loads(file.read_text(encoding="utf-8"))
    if file.name == "tokenizer_config.json":
        data[key] = None
    else:
        data.pop(key, None)
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def _differences(loaded: LoadedRecipe, base: Optional[Tokenizer], base_folder: Path,
                 experts: dict[str, _Folders]) -> Iterator[str]:
    """Refuse other token ids; report settings that differ while the recipe did not choose."""
    chosen = loaded.recipe.model_fields_set
    base_generation = _generation(base_folder, "base_model")
    for name, folders in experts.items():
        if base is not None and folders.tokenizer is not None:
            check_same_ids(base, folders.tokenizer)
            differ = _settings_differ(base, folders.tokenizer)
            if differ and "chat_template" not in chosen:
                verb = "differs" if len(differ) == 1 else "differ"
                yield (f"{folders.tokenizer.where}: its {', '.join(differ)} {verb} from base_model's; the output "
                       f"carries base_model's (set chat_template: base, or {{from: {name}}})")
        generation = _generation(folders.generation_folder, folders.generation_where)
        if generation is not None and generation != base_generation and "generation_config" not in chosen:
            yield (f"{folders.generation_where}: its {GENERATION_FILE} differs from base_model's; the output carries "
                   f"base_model's (set generation_config: base, or {{from: {name}}})")


def _tokenizer_files(policy: object, base_folder: Path, experts: dict[str, _Folders],
                     files: dict[str, Content], notes: list[str], folders: dict[Path, str]) -> str:
    """The vocabulary files (the base's, with the chosen expert's over them: the ids are equal) and the
    chosen folder's settings files; returns who they come from."""
    settings_folder, source = base_folder, RESERVED_NAME
    if isinstance(policy, FromExpert):
        source = policy.from_
        chosen = experts[source].tokenizer
        if chosen is None or not chosen.settings_files:
            raise ModeError(f"chat_template.from: expert {source!r} carries no tokenizer settings "
                            f"({', '.join(SETTINGS_FILES)})")
        settings_folder = chosen.folder
        folders[settings_folder] = chosen.where
    for folder in dict.fromkeys([base_folder, settings_folder]):
        files.update({name: folder / name for name in VOCAB_FILES if (folder / name).is_file()})
    files.update({name: settings_folder / name for name in SETTINGS_FILES if (settings_folder / name).is_file()})
    tokenizer = read_tokenizer(settings_folder, "chat_template")
    if tokenizer is not None and tokenizer.special["pad_token"] is not None and \
            tokenizer.special["pad_token"] == tokenizer.special["bos_token"]:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if name in files:
                files[name] = _unpadded_json(settings_folder / name, "pad_token")
        notes.append(f"pad token: the chosen tokenizer padded with its BOS {tokenizer.special['bos_token']!r}; the "
                     "output leaves pad unset (padding with BOS hides where a sequence starts)")
    return source


def _generation_file(policy: object, base_folder: Path, experts: dict[str, _Folders],
                     files: dict[str, Content], notes: list[str], folders: dict[Path, str]) -> Optional[str]:
    """The chosen generation_config.json; returns who it comes from (None: there is none)."""
    source: str = RESERVED_NAME
    folder: Optional[Path] = base_folder if (base_folder / GENERATION_FILE).is_file() else None
    if isinstance(policy, FromExpert):
        source, folder = policy.from_, experts[policy.from_].generation_folder
        if folder is None:
            raise ModeError(f"generation_config.from: expert {source!r} has no {GENERATION_FILE}")
        folders[folder] = experts[source].generation_where
    if folder is None:
        return None
    file = files[GENERATION_FILE] = folder / GENERATION_FILE
    _check_own(folder, (GENERATION_FILE,), folders.get(folder, "base_model"))
    generation = read_json(file, "generation_config")
    if generation.get("pad_token_id") is not None and generation["pad_token_id"] == generation.get("bos_token_id"):
        files[GENERATION_FILE] = _unpadded_json(file, "pad_token_id")
        notes.append("generation config: pad_token_id was the BOS id; the output leaves it unset")
    return source


def audit(loaded: LoadedRecipe, base_folder: Path) -> tuple[Carried, list[str]]:
    """Check every expert's token ids against the base's; choose the carried files. Returns them and
    warnings (settings that differ while the recipe did not choose, a pad token left unset)."""
    experts = {f.name: f for f in _expert_folders(loaded)}
    warnings = list(_differences(loaded, read_tokenizer(base_folder, "base_model"), base_folder, experts))
    files: dict[str, Content] = {}
    notes: list[str] = []
    folders = {base_folder: "base_model"}
    template_from = _tokenizer_files(loaded.recipe.chat_template, base_folder, experts, files, notes, folders)
    generation_from = _generation_file(loaded.recipe.generation_config, base_folder, experts, files, notes, folders)
    carried = Carried(tuple(sorted(files.items())), template_from, generation_from, tuple(notes),
                      tuple(folders.items()))
    return carried, warnings + notes
