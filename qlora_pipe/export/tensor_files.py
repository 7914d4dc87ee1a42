"""Safetensors files read and written one tensor at a time, in the memory of that tensor.

safetensors' own API reads through a memory map of the whole file (the pages read stay resident while
the file is open: a 5 GB base shard ends up counted in full) and writes a dict of every tensor of a
file (a whole output shard held, then copied once more into one bytes buffer). The format is simple
and documented (an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, then the raw little-endian bytes), so the export reads each tensor with plain
file reads into its own buffer and writes each output shard from a header planned in advance, tensor
by tensor as they are made. Files written here are reloaded by safetensors and transformers in the tests.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_pipe.errors import UserError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
COPY_CHUNK_BYTES = 16 * 2**20  # tensors passed through unchanged are copied in pieces of this size


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _count(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _as_bytes(tensor: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class TensorReader:
    """One safetensors file, read tensor by tensor with file reads (no memory map)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        try:
            (length,) = struct.unpack("<Q", self.file.read(8))
            header = json.loads(self.file.read(length))
            self.data_start = 8 + length
            self.entries: dict[str, tuple[TensorEntry, int, int]] = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                entry = TensorEntry(name, DTYPES[info["dtype"]], tuple(info["shape"]))
                begin, end = info["data_offsets"]
                self.entries[name] = (entry, self.data_start + begin, end - begin)
        except (struct.error, ValueError, KeyError) as exc:
            self.file.close()
            raise UserError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc

    def names(self) -> list[str]:
        """Tensor names in sorted order (the order safetensors' own safe_open lists them)."""
        return sorted(self.entries)

    def entry(self, name: str) -> TensorEntry:
        return self.entries[name][0]

    def _read_into(self, buffer, offset: int) -> None:
        view, done = memoryview(buffer), 0
        self.file.seek(offset)
        while done < len(view):
            count = self.file.readinto(view[done:])
            if not count:
                raise UserError(f"{self.path}: the file ends inside a tensor (truncated download?)")
            done += count

    def read(self, name: str) -> torch.Tensor:
        entry, offset, size = self.entries[name]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        if size != entry.nbytes:
            raise UserError(f"{self.path}: tensor {name} has {size} bytes for shape {list(entry.shape)}")
        if size:
            self._read_into(_as_bytes(tensor), offset)
        return tensor

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of a tensor (along its first dimension), into their own buffer."""
        entry, offset, _ = self.entries[name]
        rows = torch.empty((stop - start, *entry.shape[1:]), dtype=entry.dtype)
        row_bytes = _count(entry.shape[1:]) * rows.element_size()
        if rows.numel():
            self._read_into(_as_bytes(rows), offset + start * row_bytes)
        return rows

    def read_chunks(self, name: str, chunk_bytes: int = COPY_CHUNK_BYTES):
        """The tensor as flat pieces of about chunk_bytes each, in order (one reused buffer)."""
        entry, offset, _ = self.entries[name]
        element = torch.empty((), dtype=entry.dtype).element_size()
        per_chunk = max(1, chunk_bytes // element)
        total = _count(entry.shape)
        buffer = torch.empty(min(per_chunk, total), dtype=entry.dtype)
        if total == 0:
            yield buffer
        for start in range(0, total, per_chunk):
            piece = buffer[: min(per_chunk, total - start)]
            self._read_into(_as_bytes(piece), offset + start * element)
            yield piece

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def plan_shards(entries: list[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    """Tensors in order, a new shard when the next one would take the current one over max_bytes."""
    shards: list[list[TensorEntry]] = [[]]
    filled = 0
    for entry in entries:
        if shards[-1] and filled + entry.nbytes > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += entry.nbytes
    return [shard for shard in shards if shard]


class StreamingShardWriter:
    """Writes planned shards tensor by tensor: each shard's header is known before its first tensor, so
    a tensor goes to disk as soon as it is made and nothing is buffered beyond it."""

    def __init__(self, folder: Path, entries: list[TensorEntry], max_bytes: int) -> None:
        self.folder = folder
        self.shards = plan_shards(entries, max_bytes)
        self.total_bytes = sum(e.nbytes for e in entries)
        self.order = [(number, entry) for number, shard in enumerate(self.shards) for entry in shard]
        self.position = 0
        self.file = None
        self.written = 0  # bytes of the current tensor written so far

    def _path(self, number: int) -> Path:
        return self.folder / f"shard-{number:05d}.tmp"

    def _open(self, number: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for entry in self.shards[number]:
            header[entry.name] = {
                "dtype": CODES[entry.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.file = open(self._path(number), "wb")  # noqa: SIM115 (closed when the shard is complete)
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Bytes of the next planned tensor: the whole tensor, or consecutive flat pieces of it."""
        number, entry = self.order[self.position]
        if name != entry.name or piece.dtype != entry.dtype:
            raise RuntimeError(f"export: wrote {name} ({piece.dtype}), planned {entry.name} ({entry.dtype})")
        if self.file is None:
            self._open(number)
        data = _as_bytes(piece.contiguous())
        self.file.write(data)
        self.written += len(data)
        if self.written > entry.nbytes:
            raise RuntimeError(f"export: {name}: more bytes than its planned shape {list(entry.shape)}")
        if self.written == entry.nbytes:
            self.written = 0
            self.position += 1
            last_of_shard = self.position == len(self.order) or self.order[self.position][0] != number
            if last_of_shard:
                self.file.close()
                self.file = None

    def finish(self) -> list[tuple[str, list[str]]]:
        """Final names (model.safetensors, or numbered shards with an index); returns (file, names) per shard."""
        if self.position != len(self.order):
            raise RuntimeError(f"export: {len(self.order) - self.position} planned tensors were not written")
        count = len(self.shards)
        files = []
        for number, shard in enumerate(self.shards):
            final = "model.safetensors" if count == 1 else f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            self._path(number).rename(self.folder / final)
            files.append((final, [entry.name for entry in shard]))
        if count > 1:
            weight_map = {name: final for final, names in files for name in names}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
