"""Writing the output: safetensors shards streamed tensor by tensor, inside a staged folder.

The plan fixes every tensor's name, shape and dtype before a byte is computed, so each shard's
header is written first and each tensor's bytes go to disk the moment it is ready; nothing waits
in memory for its shard to fill (mergekit buffers whole shards). The folder is built beside the
destination and renamed into place only when complete, so no run leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from mergekit_mode.errors import ModeError
from mergekit_mode.inputs import DTYPE_TAGS
from mergekit_mode.safety import NAME_MAX, check_name_lengths

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def create_file(path: Path, data: bytes) -> None:
    """Write a new file, never over an existing one or through a link: if someone swapped the
    staging folder for a link while we write, the worst they get is new files in a folder of their
    choosing (and the build then refuses to finish), never an overwritten file."""
    with open(path, "xb") as f:
        f.write(data)


def copy_new(src: Path, dst: Path) -> None:
    """copyfile, but creating `dst` as create_file does."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout)


def assign_shards(entries: list[Entry], shard_size: int) -> list[list[Entry]]:
    """Greedy in write order: a shard closes when the next tensor would pass shard_size.
    A tensor larger than shard_size gets a shard of its own."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(entries: list[Entry]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_TAGS[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Writes tensors, in the declared order, into pre-planned safetensors shards."""

    def __init__(self, folder: Path, entries: list[Entry], shard_size: int) -> None:
        self.folder = folder
        self.shards = assign_shards(entries, shard_size)
        self.files = shard_names(len(self.shards))
        self._queue = iter([(i, e) for i, shard in enumerate(self.shards) for e in shard])
        self._shard = -1
        self._fh: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, entry = next(self._queue)
        if entry.name != name or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise AssertionError(f"writer expected {entry}, got {name} {list(tensor.shape)} {tensor.dtype}")
        if index != self._shard:
            self._open_shard(index)
        assert self._fh is not None
        if entry.nbytes:
            self._fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        self._shard = index
        self._fh = open(self.folder / self.files[index], "xb")  # see create_file
        self._fh.write(_header(self.shards[index]))

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> None:
        """Close the last shard and write the index (only when sharded, as transformers does)."""
        remaining = list(self._queue)
        if remaining:
            raise AssertionError(f"writer finished with {len(remaining)} tensors unwritten, first {remaining[0][1].name}")
        self._close_shard()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for shard in self.shards for e in shard)},
                "weight_map": {e.name: f for f, shard in zip(self.files, self.shards) for e in shard},
            }
            create_file(self.folder / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# What proves that a folder is a mergekit-mode output (--force replaces only those unless told
# otherwise): the recipe every build copies into it.
RECIPE_FILE = "mergekit_mode_recipe.yml"
STAGING_SUFFIX = ".mergekit-mode-partial"
# Written first into every staging folder: a leftover folder is taken over only if it carries it.
STAGING_MARKER = ".mergekit-mode-staging"
_TRASH_PREFIX = ".mergekit-mode-old-"  # + 8 random characters (tempfile.mkdtemp)
_LONGEST_SIBLING = max(len(STAGING_SUFFIX), len(_TRASH_PREFIX) + 8) + 1


def staging_dir(out: Path) -> Path:
    out = _named(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def _named(out: Path) -> Path:
    """`out` spelled so that it has a name and a parent (`.` and `..` do not)."""
    return Path(os.path.abspath(out)) if out.name in ("", "..") else out


def check_destination(out: Path, force: bool, needed_bytes: int, *, replace_foreign: bool = False,
                      marker: str = RECIPE_FILE) -> None:
    """Refuse destinations that would lose data or write somewhere unexpected, before any work.

    `--force` replaces only a folder that mergekit-mode wrote (it holds `marker`); any other
    non-empty folder needs `replace_foreign` (--force-foreign), because replacing deletes it."""
    out = _named(out)
    if not out.name:
        raise ModeError(f"{out}: give a folder, not the filesystem's root")
    check_name_lengths(out, "OUT")
    if len(os.fsencode(out.name)) + _LONGEST_SIBLING > NAME_MAX:
        raise ModeError(f"{out}: name too long: the staging folder beside it needs {_LONGEST_SIBLING} more bytes "
                        f"than the name, and a name may have {NAME_MAX}; use a shorter one")
    if out.is_symlink():
        raise ModeError(f"{out}: output path is a symlink; give the real folder")
    if out.exists():
        if not out.is_dir():
            raise ModeError(f"{out}: exists and is not a folder")
        if any(out.iterdir()):
            if not (force or replace_foreign):
                raise ModeError(f"{out}: folder exists and is not empty (use --force to replace it)")
            if not replace_foreign and not _is_regular(out / marker):
                raise ModeError(f"{out}: not a mergekit-mode output (no {marker} in it), so --force will not delete "
                                "it; check the path, or use --force-foreign to replace it with everything in it")
    if not out.parent.is_dir():
        raise ModeError(f"{out}: parent folder {out.parent} does not exist")
    free = shutil.disk_usage(out.parent).free
    if free < needed_bytes:
        raise ModeError(f"{out}: needs {needed_bytes / 1e9:.2f} GB, only {free / 1e9:.2f} GB free there")


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def staged_output(out: Path, force: bool, needed_bytes: int = 0, *, replace_foreign: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out`, on any failure
    (exception, Ctrl-C) it is removed.

    Everything is done relative to a descriptor of `out`'s parent and never through a link someone
    else planted: the staging folder is made here (mode 0700, so nothing can be put into it while we
    write); a leftover of a killed run is taken over only if it is a real folder of this user with
    our marker file whose lock is free; a symlink or anything else at its name is refused, not
    followed or deleted through. What is deleted is what this run made, and with --force the old
    `out` (checked by check_destination), never what a link points at."""
    check_destination(out, force, needed_bytes, replace_foreign=replace_foreign)
    out = _named(out)
    stage = staging_dir(out)
    try:
        parent = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ModeError(f"{out}: cannot open its parent folder ({e.strerror})") from None
    try:
        lock = _make_stage(out, stage, parent)
        try:
            yield from _fill_and_rename(out, stage, parent, lock)
        finally:
            os.close(lock)
    finally:
        os.close(parent)


def _make_stage(out: Path, stage: Path, parent: int) -> int:
    """A locked descriptor of a fresh (or provably our own, abandoned) staging folder."""
    try:
        os.mkdir(stage.name, 0o700, dir_fd=parent)
        fresh = True
    except FileExistsError:
        fresh = False
    except OSError as e:
        raise ModeError(f"{stage}: cannot create the staging folder ({e.strerror})") from None
    try:
        fd = os.open(stage.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    except OSError:  # a symlink (ELOOP) or not a folder (ENOTDIR): not ours, not to be touched
        raise ModeError(f"{stage}: exists and is not a staging folder of mergekit-mode (a symlink or a file); "
                        "remove it yourself if it is litter") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModeError(f"{out}: another mergekit-mode run is writing it ({stage} is locked)") from None
        if fresh:
            if any(os.scandir(fd)) or os.fstat(fd).st_uid != os.getuid():
                raise ModeError(f"{stage}: changed while it was being created; try again")
            os.close(os.open(STAGING_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd))
        else:
            _check_ours(stage, fd)
            _clear(fd)  # litter of a killed run
        return fd
    except BaseException:
        if fresh and _same(stage.name, parent, fd):  # what we just made, and nothing else
            shutil.rmtree(stage.name, dir_fd=parent, ignore_errors=True)
        os.close(fd)
        raise


def _check_ours(stage: Path, fd: int) -> None:
    """A leftover staging folder is ours if this user owns it and our marker is in it."""
    try:
        marker = os.stat(STAGING_MARKER, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        marker = None
    if os.fstat(fd).st_uid != os.getuid() or marker is None or not stat.S_ISREG(marker.st_mode):
        raise ModeError(f"{stage}: exists and was not made by a mergekit-mode run of this user (no "
                        f"{STAGING_MARKER} in it); remove it yourself if it is litter")


def _clear(fd: int) -> None:
    """Empty a staging folder but for its marker, through its descriptor (links are removed, not followed)."""
    for entry in os.scandir(fd):
        if entry.name == STAGING_MARKER:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.name, dir_fd=fd)
        else:
            os.unlink(entry.name, dir_fd=fd)


def _same(name: str, parent: int, fd: int) -> bool:
    """Whether `name` in `parent` is still the folder `fd` is open on (not swapped for a link)."""
    try:
        now = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _fill_and_rename(out: Path, stage: Path, parent: int, fd: int) -> Iterator[Path]:
    """Hand the staging folder out; when it comes back filled, and is still the folder made (not
    swapped for a link), give it ordinary permissions and rename it into place; on any failure
    remove it, but only if it is still that folder."""
    try:
        yield stage
        if not _same(stage.name, parent, fd):
            raise ModeError(f"{stage}: was replaced while the build ran; nothing was put in place")
        os.unlink(STAGING_MARKER, dir_fd=fd)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o777 & ~umask)  # the output gets the permissions of any new folder
        if os.path.lexists(out):
            _replace(out, stage, parent)
        else:
            os.rename(stage.name, out.name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        if _same(stage.name, parent, fd):
            shutil.rmtree(stage.name, dir_fd=parent, ignore_errors=True)
        raise


def _replace(out: Path, stage: Path, parent: int) -> None:
    """Swap the finished staging folder in for the old `out` (a real folder, checked before the run)
    and delete the old one; until the swap the old model stays complete."""
    if not stat.S_ISDIR(os.stat(out.name, dir_fd=parent, follow_symlinks=False).st_mode):
        raise ModeError(f"{out}: became a symlink or a file while the build ran; nothing was replaced")
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TRASH_PREFIX}", dir=out.parent)).name
    os.rename(out.name, trash, src_dir_fd=parent, dst_dir_fd=parent)  # onto the empty folder just made
    os.rename(stage.name, out.name, src_dir_fd=parent, dst_dir_fd=parent)
    shutil.rmtree(trash, dir_fd=parent)
