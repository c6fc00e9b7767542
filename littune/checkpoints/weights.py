"""The weight files of a Hugging Face checkpoint folder, read one tensor at a time, nothing trusted.

- which files: a weight index's shards (each name a plain file name of the folder: `check_shard_name`), else
  *.safetensors, else *.bin;
- .safetensors: every header entry checked (dtype, shape, offsets inside the data and of the tensor's exact size,
  no overlaps) before any tensor is read, then plain reads (`SafetensorsFile`);
- .bin: `torch.load(weights_only=True, mmap=True)` (`load_bin`), never an unpickler that resolves any global;
- the streamed state dict the copiers write into (`StreamingStateDict`), and the final check of names and shapes.

torch is imported inside the functions that use it.
"""

import json
import math
import pickle
import re
import struct
import zipfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from littune.common import UserError, first_line

NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin"}


def find_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight files of an HF folder: the index's shards, else *.safetensors, else *.bin (not training_args).

    Every index in the folder is checked, not only the one used: litgpt's own conversion prefers the .bin one.
    """
    indexed = []
    for index_name in WEIGHT_INDEXES:
        index = checkpoint_dir / index_name
        if index.is_file():
            names = index_shards(read_index(index), index_name, str(index))
            indexed.append((index, [checkpoint_dir / name for name in names]))
    for index, shards in indexed[:1]:
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise UserError(f"{index}: shard files missing: {', '.join(missing)} (re-run littune download)")
        return shards
    files = sorted(checkpoint_dir.glob("*.safetensors")) or sorted(
        f for f in checkpoint_dir.glob("*.bin") if f.name not in NOT_WEIGHTS
    )
    if not files:
        raise UserError(f"{checkpoint_dir}: no weight files (*.safetensors or *.bin) to convert")
    return files


# weight index file -> the suffix of the shards it names
WEIGHT_INDEXES = {"model.safetensors.index.json": ".safetensors", "pytorch_model.bin.index.json": ".bin"}
INDEX_MAX_BYTES = 64 << 20  # real indexes are at most a few MB (one line per tensor)


def read_index(path: Path, where: str = "") -> Any:
    """A weight index's JSON (not yet checked: `index_shards`), or a UserError saying what is wrong with the file."""
    where = where or str(path)
    if path.stat().st_size > INDEX_MAX_BYTES:
        raise UserError(f"{where}: {path.stat().st_size:,} bytes, too large for a weight index")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not a valid weight index ({type(e).__name__}: {first_line(e)})") from e


def index_shards(index: Any, index_name: str, where: str) -> list[str]:
    """The shard file names a weight index (`index_name`, one of WEIGHT_INDEXES; `where`: what errors call it) maps
    tensors to, sorted, each checked by `check_shard_name`: a name from someone else's repo is joined onto the
    checkpoint folder."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{where}: not a weight index (no weight_map of tensor names to shard files)")
    names = list(weight_map.values())
    for name in names:
        check_shard_name(name, WEIGHT_INDEXES[index_name], where)
    return sorted(set(names))


def check_shard_name(name: Any, suffix: str, where: str) -> None:
    """A weight file name from an index or a repo listing must be a plain file name in the folder, with a weight
    file's suffix: no path separator (either kind), no `..`, no drive, so that it cannot point outside."""
    if not isinstance(name, str):
        raise UserError(f"{where}: shard name {name!r} is not a string")
    if not name or any(c in name for c in "/\\:\0") or ".." in name:
        raise UserError(f"{where}: shard name {name!r} is not a plain file name (no '/', '\\', ':' or '..'); refusing "
                        f"a file outside the checkpoint folder")
    if not name.endswith(suffix):
        raise UserError(f"{where}: shard name {name!r} is not a {suffix} weight file")


class StreamingStateDict(dict):
    """A state dict that hands each tensor to the saver as it is set, so only one tensor is in memory at a time."""

    saver = None

    def __init__(self):
        super().__init__()
        self.shapes = {}

    def __setitem__(self, key, value):
        import torch

        if isinstance(value, torch.Tensor):
            self.shapes[key] = tuple(value.shape)
            large = value.nbytes >= 1 << 20
            value = self.saver.store_early(value)
            if large:
                _release_free_memory()
        else:  # an entry re-used under another name (tied lm_head)
            self.shapes[key] = next(self.shapes[k] for k, v in self.items() if v is value)
        super().__setitem__(key, value)


_malloc_trim = None


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS.

    glibc keeps freed blocks of a few MB (the previous layers' tensors and their temporaries) in its heap; over
    hundreds of tensors that can pile up to a large part of the model (seen: +200 MB on a 650 MB checkpoint, in
    some runs and not others). `malloc_trim` releases it. A no-op where the C library has no malloc_trim.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


class LazyTensor:
    """One weight, read on demand; litgpt's `load_param` calls `_load_tensor()` on such objects."""

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name

    def _load_tensor(self) -> "torch.Tensor":
        return self.handle.get_tensor(self.name)


# safetensors dtype codes -> (torch dtype name, bytes per element); the format is little-endian, like every platform
# torch runs on
_SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


def _entry_span(info) -> tuple[int, int]:
    """(begin, end) of one safetensors header entry in the data, after checking the entry; ValueError says why not.

    The bytes between begin and end must be exactly the tensor's (numel x item size): a [0, 0] span for a
    non-empty shape would otherwise hand out uninitialised memory as weights.
    """
    if not isinstance(info, dict):
        raise ValueError(f"entry is a {type(info).__name__}, not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype!r} cannot be converted (known: {', '.join(_SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise ValueError(f"data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ValueError(f"data_offsets [{begin}, {end}] do not span bytes of the data")
    expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype][1]
    if end - begin != expected:
        raise ValueError(f"data_offsets [{begin}, {end}] hold {end - begin:,} bytes, but a {dtype} tensor of shape "
                         f"{shape} has {expected:,} bytes")
    return begin, end


class SafetensorsFile:
    """Reads a .safetensors file one tensor at a time with plain reads into a fresh tensor.

    Not `safetensors.safe_open`: it memory-maps the whole file, and every page a conversion touches stays in the
    process's resident set until the file is closed, so converting a 10 GB shard would show 10 GB resident.
    """

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        try:
            self._read_header()
        except BaseException:
            self.file.close()
            raise

    def _read_header(self) -> None:
        """The header, every entry checked (`_entry_span`), none past the end of the file, no two overlapping:
        all found now, before any output is written."""
        path = self.path
        try:
            (header_size,) = struct.unpack("<Q", self.file.read(8))
            if header_size > 100_000_000:
                raise ValueError(f"header size {header_size}")
            self.header = json.loads(self.file.read(header_size))
            self.header.pop("__metadata__", None)
        except (struct.error, ValueError, UnicodeDecodeError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: not a safetensors file or truncated ({e}); delete it and download again") from e
        self.data_start = 8 + header_size
        spans = []
        for name, info in self.header.items():
            try:
                spans.append((*_entry_span(info), name))
            except ValueError as e:
                raise UserError(f"{path}: tensor {name!r}: {e}; the file is damaged or not a safetensors file") from e
        data_end = max((end for _, end, _ in spans), default=0)
        if self.data_start + data_end > path.stat().st_size:
            raise UserError(f"{path}: truncated ({path.stat().st_size:,} of {self.data_start + data_end:,} bytes); "
                            f"delete it and download again")
        spans = sorted(span for span in spans if span[1] > span[0])  # an empty tensor takes no bytes
        for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
            if begin < end:
                raise UserError(f"{path}: tensors {name!r} and {other!r} overlap in the data; the file is damaged or "
                                f"not a safetensors file")

    def keys(self):
        return self.header.keys()

    def get_tensor(self, name: str) -> "torch.Tensor":
        import torch

        info = self.header[name]  # checked by _read_header: end - begin is the tensor's size in bytes
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]][0]))
        if end > begin:
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            self.file.seek(self.data_start + begin)
            if self.file.readinto(buffer) != end - begin:  # the file shrank since it was opened
                raise UserError(f"{self.path}: truncated at tensor {name}; delete it and download again")
        return tensor

    def close(self) -> None:
        self.file.close()


def load_bin(path: Path) -> dict:
    """A torch `.bin` state dict, read with `torch.load(weights_only=True)`: tensors and plain containers only.

    Never litgpt's `lazy_load`: its unpickler resolves any global a pickle names, so an object whose `__reduce__`
    names os.system runs its command while the file is read. weights_only's unpickler refuses every global it does
    not know. mmap=True (the zip format torch.save writes since torch 1.6) leaves the tensors on disk until they are
    copied; the older format cannot be memory-mapped and is read whole, with the same restricted unpickler.
    """
    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        detail = [line for line in str(e).splitlines()  # torch's own advice around it is to load unsafely
                  if line.strip() and not line.startswith(("Weights only load failed", "Check the documentation"))]
        what = f"it names {found[1]}" if found else f"it is not a plain file of tensors ({(detail or ['?'])[0][:200]})"
        raise UserError(
            f"{path}: refused: {what}, and a pickle can run code when it is loaded; littune reads only tensors "
            f"from .bin files (use the repo's .safetensors weights if it has them)"
        ) from e
    except Exception as e:  # not a torch file, truncated, a damaged zip
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {first_line(e)})") from e
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict (a {type(state).__name__}, not a mapping of names to tensors)")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return state


class lazy_weights:
    """Context manager: name -> tensor for one weight file (safetensors: read lazily; torch .bin: memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> dict:
        if self.path.suffix == ".safetensors":
            self.handle = SafetensorsFile(self.path)
            return {name: LazyTensor(self.handle, name) for name in self.handle.keys()}
        self.handle = None
        return load_bin(self.path)

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()
        self.handle = None


def copier(family: str, config) -> tuple:
    from litgpt.scripts import convert_hf_checkpoint as hf_convert

    state_dict = StreamingStateDict()
    if family == "gpt_neox":
        return partial(hf_convert.copy_weights_gpt_neox, config), state_dict
    if family == "falcon":
        # litgpt's Falcon copier picks its layer-norm names from "7b"/"40b" in the config name
        style = "falcon-40b" if not config.shared_attention_norm else "falcon-7b"
        return partial(hf_convert.copy_weights_falcon, replace(config, name=style)), state_dict
    return partial(hf_convert.copy_weights_hf_llama, config, {}), state_dict


def check_state_dict(config, state_dict: dict, checkpoint_dir: Path) -> None:
    """Every parameter of Lit-GPT's model is there with the right shape, and nothing else."""
    import torch
    from litgpt import GPT

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    got = state_dict.shapes
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} != {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(
            [f"missing {missing[:3]}"] * bool(missing)
            + [f"unexpected {unexpected[:3]}"] * bool(unexpected)
            + [f"shape {wrong[:3]}"] * bool(wrong)
        )
        raise UserError(f"{checkpoint_dir}: weights do not match the {config.name} config: {detail}")
