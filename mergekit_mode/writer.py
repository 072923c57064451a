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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from mergekit_mode.errors import ModeError
from mergekit_mode.inputs import DTYPE_TAGS

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
        self._fh = open(self.folder / self.files[index], "wb")
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
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.mergekit-mode-partial"


def check_destination(out: Path, force: bool, needed_bytes: int) -> None:
    """Refuse destinations that would lose data or write somewhere unexpected, before any work."""
    if out.is_symlink():
        raise ModeError(f"{out}: output path is a symlink; give the real folder")
    if out.exists():
        if not out.is_dir():
            raise ModeError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise ModeError(f"{out}: folder exists and is not empty (use --force to replace it)")
    if not out.parent.is_dir():
        raise ModeError(f"{out}: parent folder {out.parent} does not exist")
    free = shutil.disk_usage(out.parent).free
    if free < needed_bytes:
        raise ModeError(f"{out}: needs {needed_bytes / 1e9:.2f} GB, only {free / 1e9:.2f} GB free there")


@contextlib.contextmanager
def staged_output(out: Path, force: bool, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out`, on any failure
    (exception, Ctrl-C) it is removed. A staging folder left by a killed run is taken over and
    cleared; one still locked by a live run is refused."""
    check_destination(out, force, needed_bytes)
    stage = staging_dir(out)
    try:
        stage.mkdir(exist_ok=True)
        lock = os.open(stage, os.O_RDONLY)
    except OSError as e:
        raise ModeError(f"{out}: cannot create staging folder {stage} ({e.strerror})") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModeError(f"{out}: another mergekit-mode run is writing it ({stage} is locked)") from None
        try:
            for child in stage.iterdir():  # litter of a killed run
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            yield stage
            if out.exists():
                trash = out.parent / f".{out.name}.mergekit-mode-old"
                shutil.rmtree(trash, ignore_errors=True)
                out.rename(trash)
                stage.rename(out)
                shutil.rmtree(trash)
            else:
                stage.rename(out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    finally:
        os.close(lock)
