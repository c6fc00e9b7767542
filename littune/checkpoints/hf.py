"""Convert a Hugging Face checkpoint folder to Lit-GPT format: `lit_model.pth` + `model_config.yaml`.

The weight-copying functions are litgpt's (`litgpt.scripts.convert_hf_checkpoint`). What littune adds: the Lit-GPT
config is built from the folder's `config.json` when the repo is not one of litgpt's named configs (fine-tuned
derivatives, small models), tensors are streamed one at a time into the output file, and the result is checked
against the model's expected parameter names and shapes before it is renamed into place.
"""

import json
import math
import pickle
import re
import struct
import sys
import zipfile
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from tqdm import tqdm

from littune.common import UserError, atomic_path, first_line

# HF `architectures` entries littune builds a Lit-GPT config for from config.json, by family.
ARCHITECTURES = {
    "GPTNeoXForCausalLM": "gpt_neox",
    "FalconForCausalLM": "falcon",
    "RWForCausalLM": "falcon",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
CONFIG_FILES = ["config.json", "generation_config.json"]
NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin"}



# ----------------------------------------------------------------------------------------------------- commands


def convert(
    checkpoint_dir: Path,
    model_name: Optional[str] = None,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    gguf_file: Optional[str] = None,
) -> None:
    """Convert a Hugging Face checkpoint folder on disk to Lit-GPT format (`lit_model.pth`, `model_config.yaml`).

    A folder holding a GGUF file (llama.cpp's format) instead of HF weights is converted from it: weights
    (dequantized), config and tokenizer files all come from the GGUF file.

    Arguments:
        checkpoint_dir: A folder holding an HF model (config.json and *.safetensors or *.bin weights) or a .gguf file.
        model_name: The litgpt config name to use (default: the folder name if litgpt knows it, else config.json).
        dtype: Convert the weights to this dtype (default: keep the dtype of the files; float32 for GGUF).
        gguf_file: The .gguf file in the folder to convert (default: the folder's only .gguf file, when the folder
            has no HF weights).
    """
    import torch
    from litgpt.utils import incremental_save

    from littune.checkpoints.gguf import convert_gguf, find_gguf_file

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir}: no such folder (download it first: littune download --repo_id ORG/NAME)")
    gguf_path = find_gguf_file(checkpoint_dir, gguf_file)
    if gguf_path is not None:
        convert_gguf(checkpoint_dir, gguf_path, model_name=model_name, dtype=dtype)
        return
    weight_files = find_weight_files(checkpoint_dir)
    config, family = resolve_config(checkpoint_dir, model_name)
    torch_dtype = getattr(torch, dtype) if dtype else None

    for weight_file in weight_files:  # a damaged file is named before any work starts
        if weight_file.suffix == ".safetensors":
            _SafetensorsFile(weight_file).close()
    if family is None:  # a litgpt named config of a family littune does not stream (phi, gemma, qwen, ...)
        _convert_with_litgpt(checkpoint_dir, config, dtype)
        return
    copy_fn, state_dict = _copier(family, config)
    total = sum(f.stat().st_size for f in weight_files)
    print(f"Converting {checkpoint_dir} ({config.name}, {total / 1e6:.1f} MB) to Lit-GPT format", file=sys.stderr)
    with atomic_path(checkpoint_dir / "lit_model.pth") as tmp:
        with incremental_save(tmp) as saver, tqdm(total=len(weight_files), desc="Converting", unit="file") as pbar:
            state_dict.saver = saver
            for weight_file in weight_files:
                with _lazy_weights(weight_file) as hf_weights:
                    try:
                        copy_fn(state_dict, hf_weights, saver=None, dtype=torch_dtype)
                    except KeyError as e:  # litgpt's name map has no entry for this tensor
                        raise UserError(
                            f"{weight_file}: tensor {e.args[0]!r} is not part of a {config.name} ({family}) model; "
                            f"is this the right --model_name / config.json?"
                        ) from e
                    except (RuntimeError, ValueError) as e:  # e.g. a q/k/v split that does not fit the head sizes
                        raise UserError(
                            f"{weight_file}: weights do not fit the {config.name} config ({first_line(e)})"
                        ) from e
                pbar.update(1)
            tied = "lm_head.weight" not in state_dict and "transformer.wte.weight" in state_dict
            if tied:  # tied embeddings: the Hub file leaves the head out
                state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
            _check_state_dict(config, state_dict, checkpoint_dir)
            saver.save(dict(state_dict))
    save_model_config(config, checkpoint_dir)
    print(f"Wrote {checkpoint_dir / 'lit_model.pth'} and {checkpoint_dir / 'model_config.yaml'}", file=sys.stderr)


def models() -> None:
    """Print the models littune can download and convert."""
    from litgpt.config import configs

    names = sorted({f"{c['hf_config']['org']}/{c['hf_config']['name']}" for c in configs}, key=str.lower)
    print("\n".join(names))
    print(
        f"\n{len(names)} named models. Any other Hub repo of these architectures also works (its config.json is "
        f"read): {', '.join(sorted(ARCHITECTURES))}.",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------------------------------ configs


def load_hf_config(checkpoint_dir: Path) -> Optional[dict]:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def resolve_config(checkpoint_dir: Path, model_name: Optional[str] = None) -> tuple[Any, Optional[str]]:
    """The Lit-GPT config for a folder, and the family littune streams it with (None: hand over to litgpt)."""
    return config_for(load_hf_config(checkpoint_dir), Path(checkpoint_dir).name, model_name, where=str(checkpoint_dir))


def config_for(
    hf: Optional[dict], name: str, model_name: Optional[str] = None, where: str = ""
) -> tuple[Any, Optional[str]]:
    """The Lit-GPT config for an HF `config.json` (None: absent) of a model called `name`, and its family.

    Order: --model_name, then `name` as a litgpt config name, then config.json. A named config whose sizes disagree
    with config.json is not used (a derivative or a small test model that reuses a famous name).
    """
    from litgpt import Config

    where = where or name
    family = _family(hf) if hf else None
    name = model_name or name
    named = _named_config(name)
    if model_name and named is None:
        raise UserError(f"--model_name {model_name!r} is not a litgpt config (`littune models` lists them)")
    if named is not None and (hf is None or _sizes_match(named, hf)):
        return named, family if hf else _family_of_named(named)
    if hf is None:
        raise UserError(f"{where}: no config.json and {name!r} is not a litgpt config name; pass --model_name")
    if family is None:
        arch = ", ".join(hf.get("architectures") or [str(hf.get("model_type"))])
        raise UserError(
            f"{where}: cannot convert architecture {arch}; littune converts "
            f"{', '.join(sorted(ARCHITECTURES))} from config.json, or a litgpt named config via --model_name"
        )
    return Config(**_config_kwargs(hf, family, name, where)), family


def _check_convertible(hf: Optional[dict], name: str, model_name: Optional[str], where: str) -> None:
    """Raise the UserError `config_for` would, importing litgpt (seconds) only when config.json alone cannot tell."""
    family = _family(hf) if hf else None
    if family and not model_name:
        try:
            _config_kwargs(hf, family, name, where)
            return
        except UserError:
            pass  # a litgpt named config may still fit
    config_for(hf, name, model_name, where)


def _config_kwargs(hf: dict, family: str, name: str, where: str) -> dict:
    try:
        return config_from_hf(hf, family, name)
    except KeyError as e:
        raise UserError(f"{where}: config.json has no {e.args[0]!r}, which a {family} model needs") from e


def config_from_hf(hf: dict, family: str, name: str) -> dict:
    """Lit-GPT `Config` keyword arguments equivalent to an HF `config.json` of a supported family."""
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    theta, rotary_fraction = _rope(hf)
    common = dict(
        name=name,
        hf_config={"org": "", "name": name},
        block_size=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"],  # the embedding on disk is already padded
        n_layer=hf["num_hidden_layers"],
        n_embd=n_embd,
        n_head=n_head,
        head_size=hf.get("head_dim") or n_embd // n_head,
        rope_base=theta,
        rotary_percentage=rotary_fraction,
    )
    if family == "gpt_neox":
        _require(hf, "hidden_act", ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"))
        return dict(
            common,
            n_query_groups=n_head,
            parallel_residual=hf.get("use_parallel_residual", True),
            bias=hf.get("attention_bias", True),
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            intermediate_size=hf.get("intermediate_size", 4 * n_embd),
            mlp_class_name="GptNeoxMLP",
            gelu_approximate="none" if hf["hidden_act"] == "gelu" else "tanh",
        )
    if family == "falcon":
        if hf.get("alibi"):
            raise UserError(f"{name}: Falcon with ALiBi position embeddings cannot be converted (only rotary)")
        if hf.get("bias"):
            raise UserError(f"{name}: Falcon with linear biases cannot be converted")
        new_arch = hf.get("new_decoder_architecture", False)
        if not new_arch and not hf.get("parallel_attn", True):
            raise UserError(f"{name}: Falcon without parallel attention cannot be converted")
        n_kv = hf.get("num_kv_heads") or n_head
        return dict(
            common,
            n_query_groups=n_kv if new_arch else (1 if hf.get("multi_query", True) else n_head),
            parallel_residual=True,
            shared_attention_norm=not new_arch,
            bias=False,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            intermediate_size=hf.get("ffn_hidden_size") or 4 * n_embd,
            mlp_class_name="GptNeoxMLP",
        )
    # llama / mistral
    _require(hf, "hidden_act", ("silu",))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"{name}: Llama-style models with linear biases cannot be converted")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return dict(
        common,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        intermediate_size=hf["intermediate_size"],
        mlp_class_name="LLaMAMLP",
        sliding_window_size=window if window and window < common["block_size"] else None,
    )


def save_model_config(config, checkpoint_dir: Path) -> None:
    """`model_config.yaml` as litgpt's `save_config` writes it, but atomically."""
    with atomic_path(Path(checkpoint_dir) / "model_config.yaml") as tmp:
        tmp.write_text(yaml.dump(asdict(config)), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ helpers


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


class _StreamingStateDict(dict):
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


class _LazyTensor:
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


class _SafetensorsFile:
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


class _lazy_weights:
    """Context manager: name -> tensor for one weight file (safetensors: read lazily; torch .bin: memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> dict:
        if self.path.suffix == ".safetensors":
            self.handle = _SafetensorsFile(self.path)
            return {name: _LazyTensor(self.handle, name) for name in self.handle.keys()}
        self.handle = None
        return load_bin(self.path)

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()
        self.handle = None


def _copier(family: str, config) -> tuple:
    from litgpt.scripts import convert_hf_checkpoint as hf_convert

    state_dict = _StreamingStateDict()
    if family == "gpt_neox":
        return partial(hf_convert.copy_weights_gpt_neox, config), state_dict
    if family == "falcon":
        # litgpt's Falcon copier picks its layer-norm names from "7b"/"40b" in the config name
        style = "falcon-40b" if not config.shared_attention_norm else "falcon-7b"
        return partial(hf_convert.copy_weights_falcon, replace(config, name=style)), state_dict
    return partial(hf_convert.copy_weights_hf_llama, config, {}), state_dict


def _check_state_dict(config, state_dict: dict, checkpoint_dir: Path) -> None:
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


def _convert_with_litgpt(checkpoint_dir: Path, config, dtype: Optional[str]) -> None:
    """litgpt's own conversion (whole files in memory), for named configs of families littune does not stream.

    litgpt writes model_config.yaml first and lit_model.pth in place: on failure both are removed again, so a
    half-converted folder never looks converted.
    """
    from unittest import mock

    from litgpt.scripts import convert_hf_checkpoint as litgpt_convert

    outputs = [checkpoint_dir / "lit_model.pth", checkpoint_dir / "model_config.yaml"]
    existed = {p: p.exists() for p in outputs}
    try:
        # litgpt reads .bin files with lazy_load, which unpickles freely (see `load_bin`): it gets load_bin instead.
        # patch.object fails loudly if litgpt ever renames the name it looks up.
        with mock.patch.object(litgpt_convert, "lazy_load", load_bin):
            litgpt_convert.convert_hf_checkpoint(checkpoint_dir, model_name=config.name, dtype=dtype)
    except BaseException as e:
        for p in outputs:
            if not existed[p]:
                p.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, UserError):
            raise UserError(f"{checkpoint_dir}: litgpt's conversion to {config.name} failed ({type(e).__name__}: "
                            f"{first_line(e)})") from e
        raise


def _named_config(name: str):
    from litgpt import Config
    from litgpt.config import name_to_config

    match = name if name in name_to_config else next((n for n in name_to_config if n.lower() == name.lower()), None)
    return Config.from_name(match) if match else None


def _family(hf: dict) -> Optional[str]:
    for arch in hf.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    return {"gpt_neox": "gpt_neox", "falcon": "falcon", "RefinedWebModel": "falcon", "llama": "llama",
            "mistral": "llama"}.get(hf.get("model_type"))


def _family_of_named(config) -> Optional[str]:
    if "falcon" in config.name.lower() and "falcon3" not in config.name.lower():
        return "falcon"
    if config.mlp_class_name == "GptNeoxMLP" and config.name.lower().startswith("pythia"):
        return "gpt_neox"
    if config.mlp_class_name == "LLaMAMLP" and config.name.lower().startswith(("llama-2", "mistral", "tinyllama")):
        return "llama"
    return None


def _sizes_match(config, hf: dict) -> bool:
    return (
        config.n_layer == hf.get("num_hidden_layers", hf.get("n_layer"))
        and config.n_embd == hf.get("hidden_size", hf.get("n_embd"))
        and config.padded_vocab_size == hf.get("vocab_size")
    )


def _rope(hf: dict) -> tuple[float, float]:
    """(theta, fraction of the head rotated), from transformers 5's rope_parameters or the older flat keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UserError(f"rope scaling {rope_type!r} in config.json cannot be converted (only default RoPE)")
    theta = params.get("rope_theta") or hf.get("rope_theta") or hf.get("rotary_emb_base") or 10000
    fraction = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or hf.get("rotary_pct") or 1.0
    return float(theta), float(fraction)


def _require(hf: dict, key: str, allowed: tuple) -> None:
    if hf.get(key) not in allowed:
        raise UserError(f"config.json {key}={hf.get(key)!r} cannot be converted (supported: {', '.join(allowed)})")


