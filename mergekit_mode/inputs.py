"""What an input folder offers, read from config.json and safetensors headers only.

Opening a model costs a few small reads: the tensors' names, shapes, dtypes and byte ranges come
from the safetensors headers, so `validate`, `--dry-run` and the planner never touch weights. The
weights themselves are read later by `TensorReader` with positional reads (`os.preadv`) into
buffers the executor owns and drops. Unlike mmap (what `safetensors.safe_open` does), plain reads
leave nothing of the inputs mapped into this process, so peak RSS stays at the tensors in flight
instead of growing with every page of every input touched.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_mode.errors import ModeError
from mergekit_mode.numerics import all_finite
from mergekit_mode.safety import check_inside, check_name_lengths, read_small_file, refuse_code

# safetensors dtype tags -> torch dtypes (the subset that model weights use).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_TAGS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# The files a tokenizer is made of (a folder has some of them): what an output's tokenizer is.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
# Files beside a model that hold JSON objects (tokenizer settings, generation defaults).
_JSON_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                    "chat_template.json", "generation_config.json")

# Above this a safetensors header is not a header but a damaged file (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live, from its file's header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header with the safetensors library's own rules: every byte range
    within the file, no duplicate names, and the tensors tiling the data exactly (no overlap, no
    alias of another tensor's bytes, no gap, no trailing bytes), so a file transformers or a runtime
    would refuse is refused here, before a build."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModeError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise ModeError(f"{file}: corrupt safetensors header (claims {header_len} bytes, file has {size})")
            raw = f.read(header_len)
    except OSError as e:
        raise ModeError(f"{file}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ModeError(f"{file}: corrupt safetensors header ({e})") from None

    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ModeError(f"{file}: corrupt safetensors header (__metadata__ must map names to strings)")
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModeError(f"{file}: tensor {name!r} has a malformed or unsupported header entry: {entry}") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise ModeError(
                f"{file}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {entry['dtype']} "
                f"(expected {expected})"
            )
        if data_start + end > size:
            raise ModeError(f"{file}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size}")
        tensors[name] = TensorInfo(name, dtype, shape, file, data_start + begin, expected)
        ranges.append((begin, end, name))
    _check_tiling(file, sorted(ranges), size - data_start)
    return tensors


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"duplicate key {key!r}")
    return dict(pairs)


def _check_tiling(file: Path, ranges: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte ranges, in offset order, must cover the data exactly once (safetensors'
    own validation): an overlap would let two tensors alias the same bytes."""
    covered = 0
    for begin, end, name in ranges:
        if begin != covered:
            what = "overlaps another tensor's bytes" if begin < covered else f"leaves bytes {covered}-{begin} unused"
            raise ModeError(f"{file}: corrupt safetensors file: tensor {name!r} {what}")
        covered = end
    if covered != data_size:
        raise ModeError(f"{file}: corrupt safetensors file: {data_size - covered} trailing bytes after the last "
                        "tensor")


@dataclass(frozen=True)
class ModelFolder:
    """A Hugging Face model folder: its raw config and where each tensor lives."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, path: Path, field: str) -> "ModelFolder":
        """Read config.json and the safetensors headers; `field` names the recipe entry in errors."""
        check_name_lengths(path, field)
        if not path.is_dir():
            raise ModeError(f"{field}: folder {path} does not exist")
        config = read_json(path / "config.json", field)
        try:
            tensors = _collect_tensors(path)
        except ModeError as e:
            raise ModeError(f"{field}: {e}") from None
        return cls(path, config, tensors)

    @classmethod
    def open_to_load(cls, path: Path, field: str, *, scripts: bool = False) -> "ModelFolder":
        """Open a folder that a library (transformers, llama.cpp's converter) will load: besides what
        `open` checks (safetensors only, every header valid, shards inside the folder), it must ask
        for no custom code (`scripts`: and hold no .py files at all)."""
        folder = cls.open(path, field)
        refuse_code(path, field, scripts=scripts)
        return folder

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def read_json(file: Path, field: str = "") -> dict:
    """A JSON object from `file`; errors name `field` (the recipe entry) when given."""
    where = f"{field}: {file}" if field else str(file)
    try:
        data = json.loads(read_small_file(file).decode("utf-8"))
    except FileNotFoundError:
        raise ModeError(f"{where} does not exist") from None
    except ModeError as e:
        raise ModeError(f"{field}: {e}" if field else str(e)) from None
    except (OSError, ValueError) as e:
        raise ModeError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModeError(f"{where} is not a JSON object")
    return data


def check_tokenizer(folder: Path, field: str) -> None:
    """Refuse a folder whose tokenizer files do not parse with the libraries that read them
    (tokenizers for tokenizer.json, sentencepiece for tokenizer.model, JSON for the settings), so no
    output is built whose tokenizer would not load. The libraries, not transformers: importing that
    costs seconds a build."""
    for name in _JSON_SIDE_FILES:
        if (folder / name).is_file():
            read_json(folder / name, field)
    file = folder / "tokenizer.json"
    try:
        if file.is_file():
            import tokenizers

            tokenizers.Tokenizer.from_file(str(file))
        file = folder / "tokenizer.model"
        if file.is_file():
            import sentencepiece

            sentencepiece.SentencePieceProcessor(model_file=str(file))
    except Exception as e:  # what each library raises for a damaged file (tokenizers: a plain Exception)
        raise ModeError(f"{field}: {file} does not load as a tokenizer ({(str(e).splitlines() or [''])[0]})") from None


def _collect_tensors(path: Path) -> dict[str, TensorInfo]:
    """All tensors of a folder: one model.safetensors, or shards listed by an index."""
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModeError(f"{index_file} has no weight_map")
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise ModeError(f"{index_file} names shard {shard!r}, which is not a file name inside the folder")
            shard_file = path / shard
            check_inside(shard_file, path, str(index_file))
            if not shard_file.is_file():
                raise ModeError(f"{index_file} names shard {shard}, which does not exist")
            for name, info in read_safetensors_header(shard_file).items():
                if weight_map.get(name) == shard:
                    tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ModeError(f"{index_file} places {missing[0]} in {weight_map[missing[0]]}, which lacks it")
        return tensors
    single = path / "model.safetensors"
    if single.is_file():
        return read_safetensors_header(single)
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise ModeError(
            f"{path} has only pickle weights (.bin/.pt); pickles can run arbitrary code and are "
            "not read. Convert them to safetensors first (e.g. load and save_pretrained(safe_serialization=True))"
        )
    raise ModeError(f"{path} has no model.safetensors or model.safetensors.index.json")


class BufferPool:
    """Byte buffers kept for reuse, by size.

    A fresh buffer costs a page fault on every 4 KB page at its first write, about as much time as
    copying those bytes from the page cache, so the write pass reads into recycled buffers: a
    model has a few tensor sizes, repeated layer after layer. At most `per_size` buffers of a
    size wait, so the pool holds a few tensors, not the model. Thread-safe (the read-ahead thread
    takes, the writing thread gives back)."""

    def __init__(self, per_size: int = 2) -> None:
        self._free: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
        self._per_size = per_size
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, *tensors: torch.Tensor) -> None:
        """Return CPU tensors whose bytes nobody needs any more (the caller drops every reference).

        All of them in one call: a buffer named twice (an input written as it was read) must go
        back once, or the read-ahead thread could take it between two calls and a second give
        would hand it out again while it is being filled."""
        flats = {}
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if tensor.device.type != "cpu" or tensor.storage_offset() or storage.nbytes() != tensor.nbytes \
                    or not tensor.is_contiguous() or tensor.nbytes == 0:
                continue  # only whole buffers: a view's bytes may belong to someone else too
            flats[storage.data_ptr()] = tensor.detach().reshape(-1).view(torch.uint8)
        with self._lock:
            for flat in flats.values():
                free = self._free[flat.numel()]
                if len(free) < self._per_size and all(f.data_ptr() != flat.data_ptr() for f in free):
                    free.append(flat)


class TensorReader:
    """Reads tensors by their header byte ranges, keeping one descriptor per file open.

    Every float tensor read is checked for NaN/Inf here, as it streams, so a damaged input is
    named (file and tensor) instead of producing a model that loads and outputs garbage. A tensor
    read whole again (a layer-streamed trainer reads each layer at every step) is not checked
    again.
    """

    def __init__(self, pool: BufferPool | None = None) -> None:
        self._fds: dict[Path, int] = {}
        self._checked_whole: set[TensorInfo] = set()
        self.pool = pool

    def read(self, info: TensorInfo) -> torch.Tensor:
        # torch.empty, not bytearray: no memset pass over bytes that are about to be overwritten.
        buf = self.pool.take(info.nbytes) if self.pool else torch.empty(info.nbytes, dtype=torch.uint8)
        self._read_into(info, memoryview(buf.numpy()), info.offset)
        tensor = buf.view(info.dtype).reshape(info.shape)
        if info not in self._checked_whole:
            self._checked(info, tensor)
            self._checked_whole.add(info)
        return tensor

    def read_rows(self, info: TensorInfo, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (any order, repeats allowed) of a tensor, reading only those rows' bytes:
        an embedding matrix is the largest tensor of a model, and a text uses a small part of it."""
        unique, inverse = torch.unique(rows.cpu(), return_inverse=True)
        if len(unique) and not 0 <= int(unique[0]) <= int(unique[-1]) < info.shape[0]:
            raise ModeError(f"{info.file}: token id {int(unique[-1])} is beyond tensor {info.name}'s "
                            f"{info.shape[0]} rows")
        row_bytes = info.nbytes // max(info.shape[0], 1)
        buf = torch.empty(len(unique) * row_bytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        # one read per run of consecutive rows
        ids = unique.tolist()
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                self._read_into(info, view[start * row_bytes:i * row_bytes], info.offset + ids[start] * row_bytes)
                start = i
        tensor = buf.view(info.dtype).reshape(len(ids), *info.shape[1:])
        return self._checked(info, tensor)[inverse]

    def _read_into(self, info: TensorInfo, view: memoryview, offset: int) -> None:
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise ModeError(f"{info.file}: truncated while reading tensor {info.name!r}")
            done += n

    @staticmethod
    def _checked(info: TensorInfo, tensor: torch.Tensor) -> torch.Tensor:
        if not all_finite(tensor):
            raise ModeError(f"{info.file}: tensor {info.name} contains NaN or Inf")
        return tensor

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Prefetcher:
    """Reads the tensors a plan will ask for, in order, one step ahead on a background thread.

    Disk reads, the finiteness check and page faults of fresh buffers then overlap with the
    main thread's conversions and writes (all of them release the GIL). At most `depth` tensors
    wait (one: two would hold two embedding-sized tensors at once), so memory stays bounded. A read that is not the next expected one is done directly.
    """

    def __init__(self, reader: TensorReader, order: list[TensorInfo], depth: int = 1) -> None:
        self._reader = reader
        self._order = collections.deque(order)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._pending: collections.deque[tuple[TensorInfo, concurrent.futures.Future]] = collections.deque()
        self._depth = depth
        self._fill()

    def _fill(self) -> None:
        while self._order and len(self._pending) < self._depth:
            info = self._order.popleft()
            self._pending.append((info, self._pool.submit(self._reader.read, info)))

    def read(self, info: TensorInfo) -> torch.Tensor:
        if self._pending and self._pending[0][0] == info:
            _, future = self._pending.popleft()
            self._fill()
            return future.result()
        return self._reader.read(info)

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
