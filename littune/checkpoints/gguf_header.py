"""A GGUF file's header (metadata and tensor table), read at a cost bounded by the file's size.

Not `gguf.GGUFReader`: it makes several numpy objects per metadata value, so an 8 MB file of a million empty token
strings took 1.64 GB and 17 s before littune could look at it. Here every count and length is checked against the
bytes left in the file before anything is allocated or looped over, values become plain Python values, and only the
keys the caller keeps are built (the others are walked over): memory is a small multiple of the kept metadata's
bytes, time linear in the header's. The layout is llama.cpp's (gguf.cpp, docs/gguf.md), versions 2 and 3.
"""

import mmap
import struct
from pathlib import Path
from typing import Any, Callable, NamedTuple

VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1024  # tensor names: llama.cpp allows 63 (GGML_MAX_NAME); keys are bounded only by the file

# GGUF metadata value types (gguf.GGUFValueType)
STRING, ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SIZES = {kind: struct.calcsize("<" + code) for kind, code in _SCALARS.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class TensorInfo(NamedTuple):
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple  # ggml order: innermost (row length) first
    n_bytes: int
    data_offset: int  # from the start of the file


class HeaderError(ValueError):
    """What is wrong with the header, in words; the caller names the file."""


def read_header(path: Path, keep: Callable[[str], bool], gguf) -> tuple[dict, dict]:
    """(metadata of the kept keys, tensor name -> TensorInfo) of a GGUF file; HeaderError if it is not one.

    `gguf`: the gguf package (its quantization types and block sizes).
    """
    size = Path(path).stat().st_size
    if size < 24:
        raise HeaderError(f"{size} bytes, shorter than a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _Header(data, size, keep, gguf).read()


class _Header:
    def __init__(self, data, size: int, keep, gguf):
        self.data, self.size, self.keep, self.gguf, self.pos = data, size, keep, gguf, 0

    # ------------------------------------------------------------------ primitives, each checked against the size

    def need(self, n_bytes: int, what: str) -> None:
        if n_bytes > self.size - self.pos:
            raise HeaderError(f"{what} runs past the end of the file (truncated)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return value

    def string(self, what: str, limit: int = None) -> str:
        n = self.u64(what)
        if limit is not None and n > limit:
            raise HeaderError(f"{what} is {n:,} bytes long (at most {limit:,})")
        self.need(n, what)
        text = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def count(self, item_bytes: int, what: str) -> int:
        """An element count, checked against the bytes left at `item_bytes` (each item's least size) apiece."""
        n = self.u64(what)
        self.need(n * item_bytes, f"{what} ({n:,} items)")
        return n

    # ------------------------------------------------------------------ the file

    def read(self) -> tuple[dict, dict]:
        if self.data[:4] != b"GGUF":
            raise HeaderError("no GGUF magic at the start")
        self.pos = 4
        version = self.u32("version")
        if version & 0xFFFF == 0:
            raise HeaderError("a big-endian GGUF file (littune reads little-endian ones)")
        if version not in VERSIONS:
            raise HeaderError(f"GGUF version {version} (littune reads versions {', '.join(map(str, VERSIONS))})")
        n_tensors = self.u64("tensor count")
        n_values = self.count(8 + 4 + 1, "metadata count")  # key length, type, a value of at least one byte
        self.need(n_tensors * (8 + 4 + 8 + 4 + 8), f"tensor table ({n_tensors:,} tensors)")
        meta, alignment = {}, DEFAULT_ALIGNMENT
        for _ in range(n_values):
            key = self.string("a metadata key")
            if key in meta:
                raise HeaderError(f"metadata key {key!r} appears twice")
            kind = self.u32(f"the type of {key}")
            if key == "general.alignment":
                if kind != 4:
                    raise HeaderError("general.alignment is not a uint32")
                alignment = self.value(kind, key)
                if alignment == 0 or alignment & (alignment - 1):
                    raise HeaderError(f"general.alignment {alignment} is not a power of two")
                meta[key] = alignment
            elif self.keep(key):
                meta[key] = self.value(kind, key)
            else:
                self.skip(kind, key)
        infos = [self.tensor_info() for _ in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        tensors = {}
        for name, dims, kind, offset in infos:
            if name in tensors:
                raise HeaderError(f"tensor {name!r} appears twice")
            tensors[name] = self.tensor(name, dims, kind, data_start + offset)
        return meta, tensors

    def value(self, kind: int, key: str, depth: int = 0) -> Any:
        if kind == STRING:
            return self.string(key)
        if kind in _SCALARS:
            self.need(_SIZES[kind], key)
            (value,) = struct.unpack_from("<" + _SCALARS[kind], self.data, self.pos)
            self.pos += _SIZES[kind]
            return value
        if kind != ARRAY:
            raise HeaderError(f"{key} has unknown value type {kind}")
        item = self.u32(f"the item type of {key}")
        if item == STRING:
            return self.strings(key)
        if item in _SCALARS:
            n = self.count(_SIZES[item], key)
            values = struct.unpack_from(f"<{n}{_SCALARS[item]}", self.data, self.pos)
            self.pos += n * _SIZES[item]
            return list(values)
        if item == ARRAY and depth < 2:  # no key littune reads holds arrays of arrays
            n = self.count(4 + 8, key)
            for _ in range(n):
                self.skip(ARRAY, key, depth + 1)
            return []
        raise HeaderError(f"{key} is an array of unknown or too deeply nested type {item}")

    def strings(self, key: str) -> list:
        """A string array: one pass, each length checked against the bytes left before its bytes are sliced."""
        n = self.count(8, key)
        data, pos, size, unpack = self.data, self.pos, self.size, _U64.unpack_from
        out = []
        append = out.append
        for _ in range(n):
            if pos + 8 > size:
                break
            (length,) = unpack(data, pos)
            pos += 8
            if length > size - pos:
                break
            append(data[pos:pos + length].decode("utf-8", errors="replace"))
            pos += length
        else:
            self.pos = pos
            return out
        raise HeaderError(f"string {len(out):,} of {key} runs past the end of the file (truncated)")

    def skip(self, kind: int, key: str, depth: int = 0) -> None:
        """Walk over a value without building it (a key the caller does not keep)."""
        if kind == STRING:
            n = self.count(1, key)  # (not `self.pos += self.count(...)`: count moves pos itself)
            self.pos += n
        elif kind in _SCALARS:
            self.need(_SIZES[kind], key)
            self.pos += _SIZES[kind]
        elif kind == ARRAY and depth < 3:
            item = self.u32(f"the item type of {key}")
            if item in _SCALARS:
                n = self.count(_SIZES[item], key)
                self.pos += n * _SIZES[item]
            elif item == STRING:
                data, unpack = self.data, _U64.unpack_from
                for _ in range(self.count(8, key)):
                    self.need(8, key)
                    self.pos += 8 + unpack(data, self.pos)[0]
                    self.need(0, key)
            else:
                for _ in range(self.count(4 + 8, key)):
                    self.skip(item, key, depth + 1)
        else:
            raise HeaderError(f"{key} has unknown or too deeply nested value type {kind}")

    # ------------------------------------------------------------------ tensors

    def tensor_info(self) -> tuple:
        name = self.string("a tensor name", limit=MAX_NAME_BYTES)
        n_dims = self.u32(f"the dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise HeaderError(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = tuple(self.u64(f"the dimensions of tensor {name}") for _ in range(n_dims))
        kind = self.u32(f"the type of tensor {name}")
        offset = self.u64(f"the data offset of tensor {name}")
        return name, dims, kind, offset

    def tensor(self, name: str, dims: tuple, kind: int, data_offset: int) -> TensorInfo:
        try:
            qtype = self.gguf.GGMLQuantizationType(kind)
            block_size, type_size = self.gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise HeaderError(f"tensor {name!r} has unknown type {kind}") from None
        if 0 in dims or dims[0] % block_size:
            raise HeaderError(f"tensor {name!r} has shape {list(dims)}, which {qtype.name} blocks of {block_size} "
                              f"do not fit")
        n_elements = 1
        for n in dims:
            n_elements *= n
        return TensorInfo(name, qtype, dims, n_elements // block_size * type_size, data_offset)
