"""Convert a GGUF file (llama.cpp's format) to Lit-GPT format: `lit_model.pth`, `model_config.yaml` and the tokenizer.

    littune convert --checkpoint_dir DIR [--gguf_file NAME.gguf]
    littune download --repo_id ORG/NAME-GGUF --gguf_file NAME.Q4_K_M.gguf

A GGUF file holds everything: the weights (often quantized), the model's sizes and the tokenizer, as metadata. The
weights are dequantized with the `gguf` package (every type its dequantizer reads: F32, F16, BF16, Q8_0, Q4_0/1,
Q5_0/1, the K-quants, ...), renamed to the Hugging Face names and streamed through the same litgpt copier, checks and
atomic writes as an HF checkpoint (`hf.py`). The Lit-GPT config is built by `config_for` from an HF-style config dict
derived from the metadata. The tokenizer is rebuilt with the `tokenizers` library from the GGUF vocabulary
(`gguf_tokenizer.py`): byte-level BPE (`tokenizer.ggml.model` "gpt2") with the pre-tokenizer named by
`tokenizer.ggml.pre`, or SentencePiece-style BPE ("llama"), and written as tokenizer.json, tokenizer_config.json
(bos/eos, add_bos_token, chat_template) and generation_config.json. The header (metadata and tensor table) is read by
`gguf_header.py`, at a cost bounded by the file's size, not by gguf.GGUFReader.

Nothing is written until the file has been checked (architecture, tensor names, types, sizes, tokenizer), and every
output is written to a temporary name and renamed: a failed conversion leaves the folder as it was.
"""

import math
import re
import sys
from functools import partial
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from littune.checkpoints.configs import config_for, config_from_hf, named_config, save_model_config, sizes_match
from littune.checkpoints.gguf_header import HeaderError, read_header
from littune.checkpoints.gguf_tokenizer import build_tokenizer, token_id
from littune.checkpoints.origin import GGUF_FIELDS, GGUF_SOURCES, gguf_origin, record_origin
from littune.checkpoints.weights import LazyTensor, StreamingStateDict, check_state_dict, copier, find_weight_files
from littune.common import UserError, atomic_path, first_line, save_json

GGUF_MISSING = "reading GGUF needs the gguf package: pip install 'littune[gguf]'"

# general.architecture -> the HF architecture whose config.json the metadata is turned into
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ARCHITECTURE_HELP = "llama (Llama, Mistral, SmolLM, ...), qwen2"

# GGUF tensor names -> HF names (llama.cpp's `gguf.constants.TENSOR_NAMES`, the part these architectures use)
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QKV_BIASES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# ----------------------------------------------------------------------------------------------------- commands


def find_gguf_file(checkpoint_dir: Path, gguf_file: Optional[str] = None) -> Optional[Path]:
    """The GGUF file `littune convert` converts in a folder, or None for an HF conversion.

    With --gguf_file: that file (a path relative to the folder). Without: the folder's only *.gguf file, unless the
    folder also holds HF weights (those are converted, as before GGUF support); several *.gguf files need --gguf_file.
    """
    checkpoint_dir = Path(checkpoint_dir)
    found = sorted(p.name for p in checkpoint_dir.glob("*.gguf") if p.is_file())
    if gguf_file:
        path = checkpoint_dir / gguf_file
        if not path.is_file():
            have = f"its GGUF files: {', '.join(found)}" if found else "it has no *.gguf file"
            raise UserError(f"{path}: no such file in {checkpoint_dir} ({have})")
        return path
    if not found or _has_hf_weights(checkpoint_dir):
        return None
    if len(found) > 1:
        raise UserError(
            f"{checkpoint_dir}: several GGUF files ({', '.join(found)}); pick one with --gguf_file {found[0]}"
        )
    return checkpoint_dir / found[0]


def convert_gguf(
    checkpoint_dir: Path,
    gguf_path: Path,
    model_name: Optional[str] = None,
    dtype: Optional[str] = None,
    tokenizer_only: bool = False,
) -> None:
    """Convert `gguf_path` into `checkpoint_dir`: lit_model.pth, model_config.yaml and the tokenizer files.

    dtype: the weights' dtype in lit_model.pth; default `default_dtype`: float32, which holds every dequantized
        value exactly, up to 1B parameters, bfloat16 above (as such models are published).
    tokenizer_only: write only tokenizer.json, tokenizer_config.json and generation_config.json.
    """
    import torch
    from litgpt.utils import incremental_save

    checkpoint_dir, gguf_path = Path(checkpoint_dir), Path(gguf_path)
    gguf = import_gguf()
    meta, tensors = _read(gguf, gguf_path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UserError(f"{gguf_path}: cannot convert GGUF architecture {arch!r}; littune converts {ARCHITECTURE_HELP}")
    split_count = meta.get("split.count")
    if split_count is not None and type(split_count) is not int:
        raise UserError(f"{gguf_path}: split.count is {split_count!r}, not a number of files")
    if (split_count or 1) > 1:
        raise UserError(
            f"{gguf_path}: part of a split GGUF ({meta['split.count']} files); merge them first "
            f"(llama-gguf-split --merge FIRST.gguf OUT.gguf)"
        )
    hf = hf_config(meta, tensors, gguf_path)
    if not tokenizer_only:  # cheap checks first: a file without the model's tensors is refused before its vocabulary
        hf_names = _hf_names(tensors, arch, gguf_path)  # unknown tensors, types, sizes: all refused before writing
        _check_tensor_data(gguf, tensors, gguf_path)
    tokenizer, tokenizer_config, generation_config = build_tokenizer(meta, str(gguf_path))

    if not tokenizer_only:
        config, family = _lit_config(hf, arch, checkpoint_dir.name, model_name, str(gguf_path))
        torch_dtype = getattr(torch, dtype) if dtype else default_dtype(tensors)
        copy_fn, state_dict = _copier(family, config)
        total = sum(int(t.n_bytes) for t in tensors.values())
        kinds = ", ".join(sorted({t.tensor_type.name for t in tensors.values()}))
        print(
            f"Converting {gguf_path} ({arch}, {config.name}, {len(tensors)} tensors in {kinds}, {total / 1e6:.1f} MB) "
            f"to Lit-GPT format",
            file=sys.stderr,
        )
        with _GGUFFile(gguf_path, tensors, hf, gguf) as handle, atomic_path(checkpoint_dir / "lit_model.pth") as tmp:
            with incremental_save(tmp) as saver, tqdm(total=len(tensors), desc="Converting", unit="tensor") as pbar:
                handle.pbar = pbar
                state_dict.saver = saver
                # one layer per call: litgpt's copier holds q, k and v until a call ends, so this bounds memory
                # to one layer's; the first call has the embedding, which a tied lm_head re-uses
                for group in _groups(hf_names):
                    _copy_group(copy_fn, state_dict, {hf_name: LazyTensor(handle, hf_name) for hf_name in group},
                                torch_dtype, gguf_path)
                check_state_dict(config, state_dict, checkpoint_dir)
                saver.save(dict(state_dict))

    with atomic_path(checkpoint_dir / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))
    save_json(tokenizer_config, checkpoint_dir / "tokenizer_config.json")
    save_json(generation_config, checkpoint_dir / "generation_config.json")
    if tokenizer_only:
        print(f"Wrote the tokenizer of {gguf_path} to {checkpoint_dir}", file=sys.stderr)
        return
    record_origin(checkpoint_dir, gguf_origin(meta), keep_repo_id=True)  # for the model cards of its exports
    save_model_config(config, checkpoint_dir)  # last: its presence marks the folder as converted
    print(
        f"Wrote {checkpoint_dir / 'lit_model.pth'}, model_config.yaml, tokenizer.json, tokenizer_config.json and "
        f"generation_config.json",
        file=sys.stderr,
    )


BFLOAT16_ABOVE = 10**9  # parameters: above, float32 weights (4 GB+) would crowd a laptop's memory


def default_dtype(tensors: dict):
    """float32 for a model of at most 1B parameters, bfloat16 above: a 7B model in float32 is 28 GB, more than a
    24 GB laptop holds, and its original weights are bfloat16 anyway (a dequantized 4-bit value loses ~0.4% in
    bfloat16's 8-bit mantissa, far below the quantization's own error). --dtype float32 keeps any model exact."""
    import torch

    parameters = sum(math.prod(t.shape) for t in tensors.values())
    if parameters <= BFLOAT16_ABOVE:
        return torch.float32
    print(f"{parameters / 1e9:.1f}B parameters: lit_model.pth in bfloat16 ({parameters * 2 / 1e9:.1f} GB; float32 "
          f"would be {parameters * 4 / 1e9:.1f} GB: --dtype float32 for that)", file=sys.stderr)
    return torch.bfloat16


def _copy_group(copy_fn, state_dict, weights: dict, torch_dtype, gguf_path: Path) -> None:
    """One layer's tensors through litgpt's copier into state_dict, its errors as one line."""
    try:
        copy_fn(state_dict, weights, saver=None, dtype=torch_dtype)
    except (RuntimeError, ValueError) as e:  # e.g. a q/k/v that does not fit the head sizes
        raise UserError(f"{gguf_path}: weights do not fit the metadata ({first_line(e)})") from e


# ------------------------------------------------------------------------------------------------ the GGUF file


def import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise UserError(GGUF_MISSING) from e
    return gguf


def _read(gguf, path: Path) -> tuple[dict, dict]:
    """(metadata of the keys littune reads, name -> TensorInfo), by `gguf_header.read_header`: not gguf.GGUFReader,
    whose per-value objects take far more memory than the values (~150 MB for a 49K-token vocabulary, 1.6 GB for
    an 8 MB file of a million empty strings)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return read_header(path, _kept_key, gguf)
    except HeaderError as e:  # bad magic, a header or tensor table cut short, an empty file, counts past the end, ...
        raise UserError(f"{path}: not a GGUF file, or truncated ({e}); delete it and download it again") from e


def _kept_key(key: str) -> bool:
    return (key == "general.architecture" or key in GGUF_FIELDS or key in GGUF_SOURCES
            or key.startswith(("tokenizer.", "split."))
            or key.split(".", 1)[0] in ARCHITECTURES)


def read_metadata(reader) -> dict:
    """A `gguf.GGUFReader`'s key/value metadata as Python values (strings, numbers, bools, lists); for files littune
    wrote itself (export checks), not for reading a user's file (`_read`)."""
    return {name: _field_value(field) for name, field in reader.fields.items()}


def _field_value(field):
    """One metadata value, from the reader's raw parts (what `ReaderField.contents()` does, for every gguf version)."""
    import numpy as np
    from gguf import GGUFValueType

    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.ARRAY:
        item = field.types[-1]
        parts = [field.parts[i] for i in field.data]
        if item == GGUFValueType.STRING:
            return [bytes(p).decode("utf-8", errors="replace") for p in parts]
        if item == GGUFValueType.ARRAY or not parts:
            return []  # nested arrays: no key littune reads has them
        values = np.concatenate(parts).tolist()
        return [bool(v) for v in values] if item == GGUFValueType.BOOL else values
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if kind is None or not field.data:
        return None
    value = field.parts[field.data[0]][0].item()
    return bool(value) if kind == GGUFValueType.BOOL else value


def _check_tensor_data(gguf, tensors: dict, path: Path) -> None:
    """Every tensor's type can be dequantized and its bytes lie inside the file (a cut-short download)."""
    import numpy as np

    size = path.stat().st_size
    readable = {}
    for name, t in tensors.items():
        qtype = t.tensor_type
        if qtype not in readable:
            readable[qtype] = _can_dequantize(gguf, qtype, np)
        if not readable[qtype]:
            raise UserError(
                f"{path}: tensor {name} is of type {qtype.name}, which the gguf package cannot dequantize "
                f"(littune reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants and the other types "
                f"gguf.quants dequantizes)"
            )
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"{path}: truncated at tensor {name}; delete it and download it again")


def _can_dequantize(gguf, qtype, np) -> bool:
    """Whether gguf.quants.dequantize reads this type: tried on one zero block."""
    _, type_size = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))
    if not type_size:
        return False
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


class _GGUFFile:
    """Reads one tensor at a time (by its HF name), dequantized to float32, Q and K un-permuted (`_unpermute`).

    Plain reads, not the reader's memory map: pages of a memory-mapped file stay resident until it is closed
    (see `weights.SafetensorsFile`). Rows are read and dequantized a few MB at a time into the output, so a tensor
    costs its float32 size and little more (dequantizing a whole tensor at once holds it about twice).
    """

    CHUNK = 16 << 20  # float32 bytes dequantized per step

    def __init__(self, path: Path, tensors: dict, hf: dict, gguf):
        self.path, self.gguf, self.pbar = path, gguf, None
        self.by_hf_name = {_hf_name(name): t for name, t in tensors.items()}
        self.n_head, self.n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
        self.permuted = hf["model_type"] == "llama"  # llama.cpp permutes q/k of Llama-family models only

    def __enter__(self):
        self.file = open(self.path, "rb")
        return self

    def __exit__(self, *exc):
        self.file.close()

    def get_tensor(self, hf_name: str) -> "torch.Tensor":
        import numpy as np
        import torch

        t = self.by_hf_name[hf_name]
        shape = tuple(reversed(t.shape))  # ggml lists dimensions innermost first
        row_length = shape[-1]
        row_bytes = self.gguf.quants.quant_shape_to_byte_shape((row_length,), t.tensor_type)[0]
        out = np.empty((t.n_bytes // row_bytes, row_length), dtype=np.float32)
        step = max(1, self.CHUNK // (4 * row_length))
        self.file.seek(t.data_offset)
        for start in range(0, len(out), step):
            rows = min(step, len(out) - start)
            raw = np.empty((rows, row_bytes), dtype=np.uint8)
            if self.file.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise UserError(f"{self.path}: truncated at tensor {t.name}; delete it and download it again")
            out[start:start + rows] = self.gguf.quants.dequantize(raw, t.tensor_type)
        tensor = torch.from_numpy(out.reshape(shape))
        if self.permuted and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = _unpermute(tensor, self.n_head if "q_proj" in hf_name else self.n_kv)
        if self.pbar is not None:
            self.pbar.update(1)
        return tensor


def _unpermute(weight, n_head: int):
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout (first half, second half) to
    interleaved pairs, which its RoPE expects: `w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)`. This is the inverse.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# -------------------------------------------------------------------------------------------- names and configs


def _hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and (suffix := BLOCK_NAMES.get(m[2]) or _QKV_BIASES.get(m[2])):
        return f"model.layers.{m[1]}.{suffix}"
    return None


def _hf_names(tensors: dict, arch: str, path: Path) -> list[str]:
    """The HF names of the file's tensors, in file order; a tensor this architecture has no place for is refused."""
    if "rope_freqs.weight" in tensors:
        raise UserError(
            f"{path}: has RoPE frequency factors (rope_freqs.weight, Llama 3.1-style rope scaling), which cannot be "
            f"converted (only default RoPE)"
        )
    names = []
    for name in tensors:
        hf_name = _hf_name(name)
        bias = hf_name is not None and hf_name.endswith("_proj.bias")
        if hf_name is None or (bias and arch != "qwen2"):
            raise UserError(f"{path}: tensor {name!r} is not part of a {arch} model littune can convert")
        names.append(hf_name)
    if "model.embed_tokens.weight" not in names:
        raise UserError(f"{path}: no token_embd.weight tensor")
    return names


def _groups(hf_names: list[str]) -> list[list[str]]:
    """The tensors outside the layers first, then one group per layer."""
    top = [n for n in hf_names if not n.startswith("model.layers.")]
    layers = {}
    for n in hf_names:
        if n.startswith("model.layers."):
            layers.setdefault(int(n.split(".")[2]), []).append(n)
    return [top] + [layers[i] for i in sorted(layers)]


def hf_config(meta: dict, tensors: dict, path: Path) -> dict:
    """An HF `config.json` dict equivalent to the GGUF metadata (as transformers' GGUF loader derives it)."""
    arch = meta["general.architecture"]

    def get(key: str, default=...):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            if default is ...:
                raise UserError(f"{path}: the GGUF metadata has no {arch}.{key}, which a {arch} model needs")
            return default
        if isinstance(value, list):
            raise UserError(f"{path}: {arch}.{key} differs between layers, which cannot be converted")
        if isinstance(value, (str, bool)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"{path}: {arch}.{key} is {value!r}, not a positive number")
        return value

    def size(key: str, default=...) -> int:
        value = get(key, default)
        if value != int(value):
            raise UserError(f"{path}: {arch}.{key} is {value!r}, not a whole number")
        return int(value)

    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UserError(f"{path}: rope scaling {scaling!r} cannot be converted (only default RoPE)")
    n_embd, n_head = size("embedding_length"), size("attention.head_count")
    head_dim = size("attention.key_length", n_embd // n_head or 1)
    rotary = size("rope.dimension_count", head_dim)
    embedding = tensors.get("token_embd.weight")
    n_tokens = len(meta.get("tokenizer.ggml.tokens") or [])
    vocab_size = int(embedding.shape[-1]) if embedding is not None else size("vocab_size", n_tokens or 1)
    if n_tokens > vocab_size:
        raise UserError(f"{path}: the tokenizer has {n_tokens} tokens but the embedding only {vocab_size} rows")
    hf = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "num_hidden_layers": size("block_count"),
        "intermediate_size": size("feed_forward_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": size("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "max_position_embeddings": size("context_length", 2048),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if rotary != head_dim:
        hf["partial_rotary_factor"] = rotary / head_dim
    for key in ("bos_token_id", "eos_token_id"):
        if token_id(meta, f"tokenizer.ggml.{key}", n_tokens) is not None:
            hf[key] = meta[f"tokenizer.ggml.{key}"]
    return hf


def _float32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(value)))


def _lit_config(hf: dict, arch: str, name: str, model_name: Optional[str], where: str):
    """The Lit-GPT config and the copier family: `config_for`'s choice (--model_name, a litgpt name, the metadata)."""
    from litgpt import Config

    if arch == "llama":
        return config_for(hf, name, model_name, where)
    # qwen2: a Llama with q/k/v biases; config_for knows no Qwen2 config.json, so the same order by hand
    named = named_config(model_name or name)
    if model_name and named is None:
        raise UserError(f"--model_name {model_name!r} is not a litgpt config (`littune models` lists them)")
    if named is not None and sizes_match(named, hf):
        return named, "qwen2"
    llama_like = {k: v for k, v in hf.items() if k not in ("attention_bias",)}
    return Config(**config_from_hf(llama_like, "llama", name), attn_bias=True), "qwen2"


def _copier(family: str, config) -> tuple:
    from litgpt.scripts import convert_hf_checkpoint as hf_convert

    if family == "qwen2":
        return partial(hf_convert.copy_weights_qwen_2_5, config, {}), StreamingStateDict()
    return copier(family, config)


def _has_hf_weights(checkpoint_dir: Path) -> bool:
    try:
        return bool(find_weight_files(checkpoint_dir))
    except UserError:
        return False
