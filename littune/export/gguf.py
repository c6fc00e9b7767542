"""`littune export --format gguf`: one .gguf file for llama.cpp / Ollama (Llama-family models), in the layout
llama.cpp's convert_hf_to_gguf.py writes; the inverse of littune's GGUF import (`littune.checkpoints.gguf`)."""

import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from littune.common import UserError, first_line
from littune.export.formats import DTYPES, ExportFormat
from littune.export.hf import lit_to_hf

# gguf.LlamaFileType and the tensor type of the 2-D weights, per --dtype
GGUF_TYPES = {"float32": ("ALL_F32", "F32"), "float16": ("MOSTLY_F16", "F16"), "bfloat16": ("MOSTLY_BF16", "BF16"),
              "q8_0": ("MOSTLY_Q8_0", "Q8_0")}
GGUF_SUFFIX = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}
# llama.cpp's pre-tokenizer names for the pre-tokenizers littune's GGUF import rebuilds, in the order preferred
PRE_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2")


def hf_to_gguf_name(hf_name: str) -> str:
    """The inverse of littune's GGUF import names (`littune.checkpoints.gguf`)."""
    from littune.checkpoints.gguf import BLOCK_NAMES, TOP_NAMES

    top = {v: k for k, v in TOP_NAMES.items()}
    if hf_name in top:
        return top[hf_name]
    block = {v: k for k, v in BLOCK_NAMES.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if not m or m[2] not in block:
        raise UserError(f"tensor {hf_name} has no GGUF name")
    return f"blk.{m[1]}.{block[m[2]]}"


def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (its `LlamaModel.permute`): each head's rows from HF's rotate-half layout (first
    half, second half) to interleaved pairs, which its RoPE expects. The inverse of `gguf._unpermute`."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tokenizer(checkpoint_dir: Path, config) -> dict:
    """The tokenizer as llama.cpp's converter puts it in the metadata: a SentencePiece model (tokenizer.model,
    "llama") or a byte-level BPE (tokenizer.json, "gpt2" with the pre-tokenizer's llama.cpp name). Refused: a
    tokenizer littune's GGUF import could not rebuild the same."""
    checkpoint_dir = Path(checkpoint_dir)
    n_vocab = config.padded_vocab_size
    if (checkpoint_dir / "tokenizer.model").is_file():
        return _spm_vocab(checkpoint_dir, n_vocab)
    path = checkpoint_dir / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the tokenizer ({first_line(e)})") from e
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{path}: --format gguf writes byte-level BPE tokenizers (tokenizer.json) and SentencePiece "
                        f"ones (tokenizer.model); this is a {model.get('type')} tokenizer"
                        f"{' with byte fallback and no tokenizer.model' if model.get('byte_fallback') else ''}")
    pre = _pre_name(data, path)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [5] * n_vocab  # UNUSED: rows of a padded embedding that no token has
    for token, i in model.get("vocab", {}).items():
        if i >= n_vocab:
            raise UserError(f"{path}: token id {i} is outside the model's {n_vocab} embedding rows")
        tokens[i], types[i] = token, 1  # NORMAL
    for added in data.get("added_tokens") or []:
        i, token = added["id"], added["content"]
        if i >= n_vocab:
            raise UserError(f"{path}: token id {i} is outside the model's {n_vocab} embedding rows")
        special = added.get("special") or (token.startswith("<|") and token.endswith("|>"))
        tokens[i], types[i] = token, 3 if special else 4  # CONTROL, USER_DEFINED (as llama.cpp's get_vocab_base)
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "scores": None}


def _pre_name(data: dict, path: Path) -> str:
    """llama.cpp's name of the tokenizer.json's pre-tokenizer, matched against the ones littune's import builds
    (llama.cpp identifies it by hashing the token ids of a test text, which only works for the models it lists)."""
    from littune.checkpoints.gguf_tokenizer import PRE_TOKENIZERS

    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regex, digits, byte_level = None, False, None
    for step in steps:
        kind = step.get("type")
        if kind == "Digits" and step.get("individual_digits"):
            digits = True
        elif kind == "Split" and "Regex" in (step.get("pattern") or {}) and step.get("behavior") == "Isolated":
            regex = step["pattern"]["Regex"]
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            byte_level = step
        else:
            byte_level = None
            break
    normalizer = (data.get("normalizer") or {}).get("type")
    for name in PRE_NAMES:
        expected_regex, expected_digits = PRE_TOKENIZERS[name]
        if (byte_level is not None and (regex, digits) == (expected_regex, expected_digits)
                and bool(byte_level.get("use_regex", True)) == (regex is None)
                and normalizer == ("NFC" if name == "qwen2" else None)):
            return name
    raise UserError(f"{path}: its pre-tokenizer is none that GGUF names and littune knows ({', '.join(PRE_NAMES)}); "
                    f"use --format hf")


def _spm_vocab(checkpoint_dir: Path, n_vocab: int) -> dict:
    """A SentencePiece tokenizer.model as llama.cpp's `_create_vocab_sentencepiece` writes it: pieces, scores and
    types by id, added tokens from added_tokens.json / tokenizer_config.json, [PADn] up to the embedding's rows."""
    from sentencepiece import SentencePieceProcessor

    path = checkpoint_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: not a SentencePiece model ({first_line(e)})") from e
    if sp.vocab_size() > n_vocab:
        raise UserError(f"{path}: {sp.vocab_size()} tokens but the model has {n_vocab} embedding rows")
    tokens, scores, types = [f"[PAD{i}]" for i in range(n_vocab)], [-1000.0] * n_vocab, [5] * n_vocab
    for i in range(sp.vocab_size()):
        kind = 2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i) else 6 if sp.IsByte(i) else 1
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), kind
    added = {}
    if (checkpoint_dir / "added_tokens.json").is_file():
        added = {i: (t, False) for t, i in json.loads((checkpoint_dir / "added_tokens.json").read_text()).items()}
    if (checkpoint_dir / "tokenizer_config.json").is_file():
        decoder = json.loads((checkpoint_dir / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
        added.update({int(i): (d["content"], bool(d.get("special"))) for i, d in decoder.items()})
    for i, (token, special) in added.items():
        if i < n_vocab:
            special = special or (token.startswith("<|") and token.endswith("|>"))
            tokens[i], scores[i], types[i] = token, -1000.0, 3 if special else 4
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "scores": scores}


def write_gguf(folder: Path, config, state: dict, checkpoint_dir: Path, tokenizer: dict, dtype_name: str,
               prompt=None, template: Optional[str] = None) -> Path:
    """One .gguf file in folder, written tensor by tensor (the header first, from the tensors' sizes). prompt (a
    `template.RunPrompt`) and template: the run's BOS rule and chat template (`littune.export.template`)."""
    import numpy as np

    from littune.checkpoints.gguf import import_gguf

    gguf = import_gguf()
    Q = gguf.GGMLQuantizationType
    file_type, weight_type = GGUF_TYPES[dtype_name]
    tied = torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    hf = lit_to_hf(config, "llama", state)
    if tied:  # llama.cpp reads a missing output.weight as tied to token_embd
        del hf["lm_head.weight"]
    plan = []  # (gguf name, hf name, type, numpy dtype, stored shape)
    for hf_name, t in hf.items():
        name = hf_to_gguf_name(hf_name)
        qtype = Q.F32 if t.dim() == 1 or name.endswith("_norm.weight") else Q[weight_type]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if qtype == Q.Q8_0 and t.shape[-1] % block:
            qtype = Q.F16  # rows that do not fill whole Q8_0 blocks: llama.cpp's converter falls back to F16 too
        shape = tuple(t.shape)
        if qtype in (Q.F32, Q.F16):
            np_dtype = np.float32 if qtype == Q.F32 else np.float16
        else:
            np_dtype, shape = np.uint8, tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
        plan.append((name, hf_name, qtype, np_dtype, shape))

    path = folder / f"{config.name}-{GGUF_SUFFIX[dtype_name]}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    _gguf_metadata(gguf, writer, config, checkpoint_dir, tokenizer, getattr(gguf.LlamaFileType, file_type), prompt,
                   template)
    for name, _, qtype, np_dtype, shape in plan:
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        writer.add_tensor_info(name, shape, np.dtype(np_dtype), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, hf_name, qtype, _, _ in tqdm(plan, desc=f"Writing {path.name}", unit="tensor", file=sys.stderr):
        t = hf[hf_name].float()
        if hf_name.endswith("q_proj.weight"):
            t = permute(t, config.n_head)
        elif hf_name.endswith("k_proj.weight"):
            t = permute(t, config.n_query_groups)
        writer.write_tensor_data(gguf.quants.quantize(t.contiguous().numpy(), qtype))
    writer.close()
    return path


def _gguf_metadata(gguf, writer, config, checkpoint_dir: Path, tokenizer: dict, file_type, prompt=None,
                   template: Optional[str] = None) -> None:
    """The keys llama.cpp's converter writes for a LlamaForCausalLM (`TextModel.set_gguf_parameters`,
    `LlamaModel.set_gguf_parameters` and `set_vocab`). With a run's prompt: its chat template, and llama.cpp adds
    BOS exactly where littune's tokenizer does (add_bos_token = use_bos, bos_token_id = littune's BOS) and never an
    EOS after the prompt; the template leaves BOS to llama.cpp (`littune.export.template`)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(config.name)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_rope_freq_base(float(config.rope_base))
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.head_size != config.n_embd // config.n_head:  # llama.cpp derives it otherwise
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.padded_vocab_size)
    writer.add_rope_dimension_count(config.rope_n_elem)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(tokenizer["model"])
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    if tokenizer["scores"] is not None:
        writer.add_token_scores(tokenizer["scores"])
    writer.add_token_types(tokenizer["types"])
    # merges, bos/eos/unk/pad ids, add_bos/add_eos and the chat template, read as llama.cpp reads them
    special = gguf.SpecialVocab(checkpoint_dir, load_merges=tokenizer["model"] == "gpt2",
                                n_vocab=len(tokenizer["tokens"]))
    if prompt is not None:
        special.chat_template = template
        special.add_special_token.update(bos=prompt.use_bos, eos=False)
        if prompt.use_bos:
            special.special_token_ids["bos"] = prompt.bos_id
    special.add_to_gguf(writer, quiet=True)
    tokenizer_config = Path(checkpoint_dir) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        value = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("add_prefix_space")
        if isinstance(value, bool):
            writer.add_add_space_prefix(value)


def check_gguf_model(config, checkpoint_dir: Path, family: str) -> None:
    """GGUF is written for Llama-family models, without sliding-window attention."""
    if family != "llama":
        raise UserError(f"{checkpoint_dir}: --format gguf writes Llama-family models (Llama, Mistral, SmolLM, ...); "
                        f"{config.name} is {family}: use --format hf")
    if config.sliding_window_size is not None:
        raise UserError(f"{checkpoint_dir}: {config.name} uses sliding-window attention, which llama.cpp's llama "
                        f"architecture does not apply: use --format hf")


def write(job, folder: Path) -> str:
    path = write_gguf(folder, job.config, job.state, job.checkpoint_dir, job.prepared, job.dtype or "float16",
                      job.prompt, job.template)
    return f"Wrote {job.out_dir / path.name}"


FORMAT = ExportFormat(
    name="gguf",
    summary="one .gguf file for llama.cpp and Ollama (Llama-family models)",
    write=write,
    dtypes=DTYPES,
    gguf_template=True,
    check=check_gguf_model,
    prepare=gguf_tokenizer,  # refuses a tokenizer llama.cpp could not read, before anything is written
)
