"""What a folder or file from someone else may not do to us: run code, point outside itself, be a
device or a FIFO, or carry a name the filesystem cannot hold.

Model folders arrive from strangers (a download, a colleague's share). Reading them must never
execute anything (pickles, `auto_map` custom code, `*.py` that a converter with
trust_remote_code imports), never read outside the folder through a planted symlink (a
tokenizer.json that points at ~/.ssh/id_rsa would be copied into the output and published with
it), and never hang or exhaust memory on a file that is not a regular file (config.json ->
/dev/zero, a FIFO). Every command that opens a folder goes through these checks, so the rules live
here once.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from mergekit_mode.errors import ModeError

# Linux's (and macOS's) longest file name, in bytes. Checked up front so a long name is one line,
# not an OSError traceback from deep inside a run.
NAME_MAX = 255

# Small files (configs, indexes, recipes) are read whole; above this they are not what they claim.
SMALL_FILE_LIMIT = 64 * 2**20

# Files beside a model's config that transformers treats as code or as pointers to code.
_CODE_KEYS_FILES = ("config.json", "tokenizer_config.json")


def name_too_long(path: Path) -> str | None:
    """Why `path` cannot exist (a component longer than a filesystem allows), or None."""
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            return f"{path}: a name in it is {size} bytes long, more than the {NAME_MAX} a filesystem allows"
    return None


def check_name_lengths(path: Path, field: str) -> None:
    """Refuse a path that would fail with ENAMETOOLONG later, deep inside a run."""
    problem = name_too_long(path)
    if problem:
        raise ModeError(f"{field}: {problem}")


def read_small_file(file: Path, limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; raises ModeError for anything else.

    Opened non-blocking so a FIFO cannot hang us, and checked on the open descriptor so /dev/zero
    or a huge file is refused before a byte is read. FileNotFoundError passes through."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ModeError(f"{file}: cannot read ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModeError(f"{file}: not a regular file (a device, FIFO or socket)")
        if info.st_size > limit:
            raise ModeError(f"{file}: {info.st_size} bytes, more than the {limit // 2**20} MiB such a file can "
                            "have; it is damaged or not what its name says")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ModeError(f"{file}: grew past {limit // 2**20} MiB while being read")
        return data
    except OSError as e:
        raise ModeError(f"{file}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where a folder's files may really live: inside it, or, for a Hugging Face cache snapshot
    (models--org--name/snapshots/<hash>/), in that repository's blobs/ (its files are links there)."""
    real = folder.resolve()
    roots = [real]
    if folder.absolute().parent.name == "snapshots":
        roots.append((folder.absolute().parent.parent / "blobs").resolve())
    return tuple(roots)


def check_inside(file: Path, folder: Path, field: str) -> None:
    """Refuse `file` (a name in `folder`, maybe a symlink) when it really lives outside the folder."""
    real = file.resolve()
    if not any(real == root or root in real.parents for root in allowed_roots(folder)):
        raise ModeError(f"{field}: {file} points outside {folder} (to {real}); a model folder's files must "
                        "be its own")


def check_regular_inside(file: Path, folder: Path, field: str) -> None:
    """`file` really lives in `folder` and is a regular file (what may be copied into an output)."""
    check_inside(file, folder, field)
    if not file.is_file():
        raise ModeError(f"{field}: {file} is not a regular file (a device, FIFO or socket)")


def refuse_code(folder: Path, field: str, *, scripts: bool = False) -> None:
    """Refuse a folder that asks for custom code: an `auto_map` in its config.json or
    tokenizer_config.json (transformers would import the folder's .py files to load it), and with
    `scripts`, any .py file at all (for tools that load folders with trust_remote_code, such as
    llama.cpp's converter for some architectures)."""
    for name in _CODE_KEYS_FILES:
        file = folder / name
        if not file.exists():
            continue
        try:
            data = json.loads(read_small_file(file))
        except (ValueError, UnicodeDecodeError):
            continue  # unreadable JSON is reported by whoever needs the file
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModeError(f"{field}: {file} has an auto_map (custom code in the folder); mergekit-mode never "
                            "runs a model folder's code: use a model of a standard architecture")
    if scripts:
        code = sorted(p.name for p in folder.glob("*.py"))
        if code:
            raise ModeError(f"{field}: {folder} holds Python code ({code[0]}); refused so that no tool run on "
                            "it can import it. Remove the .py files if the model does not need them")


def _identities(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of `path` and of each of its existing ancestors, links followed."""
    ids = []
    for p in (path.absolute(), *path.absolute().parents):
        try:
            st = p.stat()
        except OSError:
            continue
        ids.append((st.st_dev, st.st_ino))
    return ids


def contains(folder: Path, path: Path) -> bool:
    """Whether `path` is `folder` or lies inside it, through any symlink or bind mount (compared by
    inode, not by spelling). `path` need not exist."""
    try:
        st = folder.stat()
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _identities(path.resolve())
