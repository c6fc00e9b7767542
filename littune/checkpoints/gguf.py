"""Convert a GGUF file (llama.cpp's format) to Lit-GPT format: `lit_model.pth`, `model_config.yaml` and the tokenizer.

    littune convert --checkpoint_dir DIR [--gguf_file NAME.gguf]
    littune download --repo_id ORG/NAME-GGUF --gguf_file NAME.Q4_K_M.gguf

A GGUF file holds everything: the weights (often quantized), the model's sizes and the tokenizer, as metadata. The
weights are dequantized with the `gguf` package (every type its dequantizer reads: F32, F16, BF16, Q8_0, Q4_0/1,
Q5_0/1, the K-quants, ...), renamed to the Hugging Face names and streamed through the same litgpt copier, checks and
atomic writes as an HF checkpoint (`hf.py`). The Lit-GPT config is built by `config_for` from an HF-style config dict
derived from the metadata. The tokenizer is rebuilt with the `tokenizers` library from the GGUF vocabulary:
byte-level BPE (`tokenizer.ggml.model` "gpt2") with the pre-tokenizer named by `tokenizer.ggml.pre`, or
SentencePiece-style BPE ("llama"), and written as tokenizer.json, tokenizer_config.json (bos/eos, add_bos_token,
chat_template) and generation_config.json.

Nothing is written until the file has been checked (architecture, tensor names, types, sizes, tokenizer), and every
output is written to a temporary name and renamed: a failed conversion leaves the folder as it was.
"""

import re
import sys
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Optional

from tqdm import tqdm

from littune.common import UserError, atomic_path, first_line, save_json

GGUF_MISSING = "reading GGUF needs the gguf package: pip install 'littune[gguf]'"

# general.architecture -> the HF architecture whose config.json the metadata is turned into
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ARCHITECTURE_HELP = "llama (Llama, Mistral, SmolLM, ...), qwen2"

# GGUF tensor names -> HF names (llama.cpp's `gguf.constants.TENSOR_NAMES`, the part these architectures use)
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
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

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> how the original tokenizer.json split text before byte-level BPE: a regex applied first
# (None: GPT-2's, which the byte-level step applies itself) and whether digits are split one by one. The regexes are
# the ones of the models' tokenizer.json files, which llama.cpp's llama-vocab.cpp reimplements per pre type.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    # "default": files written before llama.cpp recorded the pre-tokenizer; GPT-2's is what transformers uses too
    "default": (None, False), "gpt2": (None, False), "gpt-2": (None, False), "mpt": (None, False),
    "olmo": (None, False),
    "smollm": (None, True), "starcoder": (None, True), "refact": (None, True),
    "llama-bpe": (_LLAMA3_REGEX, False), "llama3": (_LLAMA3_REGEX, False), "llama-v3": (_LLAMA3_REGEX, False),
    "dbrx": (_LLAMA3_REGEX, False), "smaug-bpe": (_LLAMA3_REGEX, False),
    "qwen2": (_QWEN2_REGEX, False), "stablelm2": (_QWEN2_REGEX, False),
}
# pre types whose tokenizer.json has `ignore_merges` (a word that is a token is not re-merged), as llama.cpp sets it
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}
# pre types whose BPE tokenizers add BOS when the metadata does not say (llama.cpp's defaults)
_ADD_BOS = {"llama-bpe", "llama3", "llama-v3"}


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

    dtype: the weights' dtype in lit_model.pth; default float32, which holds every dequantized value exactly.
    tokenizer_only: write only tokenizer.json, tokenizer_config.json and generation_config.json.
    """
    import torch
    from litgpt.utils import incremental_save

    from littune.checkpoints.hf import _check_state_dict, _LazyTensor, save_model_config

    checkpoint_dir, gguf_path = Path(checkpoint_dir), Path(gguf_path)
    gguf = _import_gguf()
    meta, tensors = _read(gguf, gguf_path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{gguf_path}: cannot convert GGUF architecture {arch!r}; littune converts {ARCHITECTURE_HELP}")
    if int(meta.get("split.count") or 1) > 1:
        raise UserError(
            f"{gguf_path}: part of a split GGUF ({meta['split.count']} files); merge them first "
            f"(llama-gguf-split --merge FIRST.gguf OUT.gguf)"
        )
    hf = hf_config(meta, tensors, gguf_path)
    tokenizer, tokenizer_config, generation_config = build_tokenizer(meta, str(gguf_path))

    if not tokenizer_only:
        hf_names = _hf_names(tensors, arch, gguf_path)  # unknown tensors, types, sizes: all refused before writing
        _check_tensor_data(gguf, tensors, gguf_path)
        config, family = _lit_config(hf, arch, checkpoint_dir.name, model_name, str(gguf_path))
        torch_dtype = getattr(torch, dtype) if dtype else torch.float32
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
                    weights = {hf_name: _LazyTensor(handle, hf_name) for hf_name in group}
                    try:
                        copy_fn(state_dict, weights, saver=None, dtype=torch_dtype)
                    except (RuntimeError, ValueError) as e:  # e.g. a q/k/v that does not fit the head sizes
                        raise UserError(f"{gguf_path}: weights do not fit the metadata ({first_line(e)})") from e
                _check_state_dict(config, state_dict, checkpoint_dir)
                saver.save(dict(state_dict))

    with atomic_path(checkpoint_dir / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))
    save_json(tokenizer_config, checkpoint_dir / "tokenizer_config.json")
    save_json(generation_config, checkpoint_dir / "generation_config.json")
    if tokenizer_only:
        print(f"Wrote the tokenizer of {gguf_path} to {checkpoint_dir}", file=sys.stderr)
        return
    save_model_config(config, checkpoint_dir)  # last: its presence marks the folder as converted
    print(
        f"Wrote {checkpoint_dir / 'lit_model.pth'}, model_config.yaml, tokenizer.json, tokenizer_config.json and "
        f"generation_config.json",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------------------------ the GGUF file


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise UserError(GGUF_MISSING) from e
    return gguf


class TensorInfo(NamedTuple):
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple  # ggml order: innermost (row length) first
    n_bytes: int
    data_offset: int  # from the start of the file


def _read(gguf, path: Path) -> tuple[dict, dict]:
    """(metadata, name -> TensorInfo). The reader itself is dropped: its per-value objects take far more memory
    than the values (~150 MB for a 49K-token vocabulary)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # bad magic, a header or tensor table cut short, an empty file, ...
        raise UserError(
            f"{path}: not a GGUF file, or truncated ({first_line(e)}); delete it and download it again"
        ) from e
    tensors = {
        t.name: TensorInfo(t.name, t.tensor_type, tuple(int(n) for n in t.shape), int(t.n_bytes), int(t.data_offset))
        for t in reader.tensors
    }
    return read_metadata(reader), tensors


def read_metadata(reader) -> dict:
    """The GGUF key/value metadata as Python values (strings, numbers, bools, lists)."""
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
    (see `hf._SafetensorsFile`). Rows are read and dequantized a few MB at a time into the output, so a tensor
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
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and (suffix := _BLOCK_NAMES.get(m[2]) or _QKV_BIASES.get(m[2])):
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
        return value

    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UserError(f"{path}: rope scaling {scaling!r} cannot be converted (only default RoPE)")
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", n_embd // n_head))
    rotary = int(get("rope.dimension_count", head_dim))
    embedding = tensors.get("token_embd.weight")
    n_tokens = len(meta.get("tokenizer.ggml.tokens") or [])
    vocab_size = int(embedding.shape[-1]) if embedding is not None else int(get("vocab_size", n_tokens))
    if n_tokens > vocab_size:
        raise UserError(f"{path}: the tokenizer has {n_tokens} tokens but the embedding only {vocab_size} rows")
    hf = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if rotary != head_dim:
        hf["partial_rotary_factor"] = rotary / head_dim
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(meta.get(f"tokenizer.ggml.{key}"), int):
            hf[key] = meta[f"tokenizer.ggml.{key}"]
    return hf


def _float32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(value)))


def _lit_config(hf: dict, arch: str, name: str, model_name: Optional[str], where: str):
    """The Lit-GPT config and the copier family: `config_for`'s choice (--model_name, a litgpt name, the metadata)."""
    from litgpt import Config

    from littune.checkpoints.hf import _named_config, _sizes_match, config_for, config_from_hf

    if arch == "llama":
        return config_for(hf, name, model_name, where)
    # qwen2: a Llama with q/k/v biases; config_for knows no Qwen2 config.json, so the same order by hand
    named = _named_config(model_name or name)
    if model_name and named is None:
        raise UserError(f"--model_name {model_name!r} is not a litgpt config (`littune models` lists them)")
    if named is not None and _sizes_match(named, hf):
        return named, "qwen2"
    llama_like = {k: v for k, v in hf.items() if k not in ("attention_bias",)}
    return Config(**config_from_hf(llama_like, "llama", name), attn_bias=True), "qwen2"


def _copier(family: str, config) -> tuple:
    from litgpt.scripts import convert_hf_checkpoint as hf_convert

    from littune.checkpoints import hf

    if family == "qwen2":
        return partial(hf_convert.copy_weights_qwen_2_5, config, {}), hf._StreamingStateDict()
    return hf._copier(family, config)


def _has_hf_weights(checkpoint_dir: Path) -> bool:
    from littune.checkpoints.hf import find_weight_files

    try:
        return bool(find_weight_files(checkpoint_dir))
    except UserError:
        return False


# ---------------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(meta: dict, where: str) -> tuple:
    """(tokenizers.Tokenizer, tokenizer_config.json dict, generation_config.json dict) from the GGUF metadata."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{where}: the GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type")
    if not types:  # a file without token types: at least bos/eos/unk must stay one token each
        types = [NORMAL] * len(tokens)
        for key in ("bos", "eos", "unknown"):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(i, int) and 0 <= i < len(types):
                types[i] = CONTROL
    model = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if model == "gpt2":
        tokenizer = _bpe_tokenizer(tokens, types, meta.get("tokenizer.ggml.merges") or [], pre, where)
        add_bos_default = pre in _ADD_BOS
    elif model == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        tokenizer = _spm_tokenizer(tokens, types, scores, meta.get("tokenizer.ggml.unknown_token_id"), add_prefix)
        add_bos_default = True
    else:
        raise UserError(
            f"{where}: tokenizer type {model!r} cannot be converted; littune builds gpt2 (byte-level BPE) and llama "
            f"(SentencePiece) tokenizers"
        )

    def token(key: str) -> Optional[str]:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {
        # "LlamaTokenizer" in the class name makes litgpt decode single SentencePiece tokens with their leading space
        "tokenizer_class": "LlamaTokenizerFast" if model == "llama" else "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    arch = meta.get("general.architecture")
    if isinstance(meta.get(f"{arch}.context_length"), int):
        config["model_max_length"] = meta[f"{arch}.context_length"]
    config = {k: v for k, v in config.items() if v is not None}
    generation = {
        f"{key}_token_id": meta[f"tokenizer.ggml.{gguf_key}_token_id"]
        for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
        if isinstance(meta.get(f"tokenizer.ggml.{gguf_key}_token_id"), int)
    }
    return tokenizer, config, generation


def _bpe_tokenizer(tokens: list, types: list, merges: list, pre: str, where: str):
    """A byte-level BPE tokenizer.json like the model's original one (GPT-2, Llama 3, SmolLM, Qwen2 families)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    if pre not in PRE_TOKENIZERS:
        raise UserError(
            f"{where}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) cannot be converted; littune knows "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    if not merges:
        raise UserError(f"{where}: a gpt2 (BPE) tokenizer without merges (tokenizer.ggml.merges)")
    regex, individual_digits = PRE_TOKENIZERS[pre]
    vocab = _vocab(tokens)
    pairs = []
    for merge in merges:
        split = merge.find(" ", 1)  # as llama.cpp: a piece may itself start with a space
        if split < 0:
            raise UserError(f"{where}: malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((merge[:split], merge[split + 1:]))
    tokenizer = Tokenizer(BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    steps = []
    if individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is not None:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=regex is None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_tokens(tokenizer, tokens, types)
    return tokenizer


def _spm_tokenizer(tokens: list, types: list, scores: list, unk_id: Optional[int], add_prefix: bool):
    """A SentencePiece-style BPE (Llama 2, Mistral): merges ranked by the merged piece's score, byte fallback.

    As transformers' LlamaConverter builds it from tokenizer.model, in its "legacy" form, which is llama.cpp's
    behaviour: a "▁" is prepended to the text and after every special token.
    """
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    vocab = _vocab(tokens)
    mergeable = {t for t, kind in zip(tokens, types) if kind == NORMAL}
    candidates = []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                candidates.append((-scores[i], i, vocab[left], vocab[right], left, right))
    merges = [(c[4], c[5]) for c in sorted(candidates)]
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if add_prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * bool(add_prefix))
    _add_tokens(tokenizer, tokens, types)
    return tokenizer


def _vocab(tokens: list) -> dict:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id
    return vocab


def _add_tokens(tokenizer, tokens: list, types: list) -> None:
    """Control tokens (<|im_start|>, <s>) become special added tokens, user-defined ones plain added tokens, so
    that each is matched in the text as one id, before the pre-tokenizer could split it."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
