"""Leave littune with a fine-tuned model: fold a LoRA run into the base weights (`littune merge`), or write the model
in the formats other tools read (`littune export`).

    littune merge  --checkpoint_dir checkpoints/ORG/NAME --adapter_path out/lora/my --out_dir checkpoints/my-merged
    littune export --checkpoint_dir checkpoints/ORG/NAME --adapter_path out/lora/my --format hf   --out_dir export/hf
    littune export --checkpoint_dir checkpoints/ORG/NAME --adapter_path out/lora/my --format peft --out_dir export/peft
    littune export --checkpoint_dir checkpoints/ORG/NAME --adapter_path out/lora/my --format gguf --out_dir export/gguf \
        --dtype q8_0

- merge: a converted checkpoint folder (lit_model.pth with the LoRA update added, model_config.yaml, tokenizer and
  generation files, the run's prompt_style.yaml) that generate, evaluate and serve use without --adapter_path.
- hf: a transformers folder (config.json, model.safetensors, sharded above --max_shard_size as transformers does,
  generation_config.json, tokenizer files) for Llama/Mistral, Falcon and GPT-NeoX; a LoRA run is merged first. The
  weights are renamed with litgpt's Lit -> HF copiers (`litgpt.scripts.convert_lit_checkpoint`), the inverse of the
  copiers `littune convert` uses; config.json is built so that it converts back to the same Lit-GPT config, and a
  model whose config would not is refused.
- peft: the LoRA weights alone as PEFT writes them (adapter_model.safetensors + adapter_config.json), to load onto
  the original transformers model (PEFT, vLLM's LoRA serving, llama.cpp's convert_lora_to_gguf).
- gguf: one .gguf file for llama.cpp / Ollama (Llama-family models), in the layout llama.cpp's convert_hf_to_gguf.py
  writes: its tensor names, Q and K rows permuted for its RoPE, norms in F32, the tokenizer and chat template in the
  metadata. The inverse of littune's own GGUF import (`littune.checkpoints.gguf`).

An adapter_v2 run is refused: its learned prefix is attended to as extra keys and values, which no weight matrix of
the base model can express. Everything is checked before anything is written; the output is built in a hidden
temporary folder beside --out_dir and renamed into place at the end, so a failed or interrupted export leaves no
half-written folder.

This is the inference side: it never imports the training package.
"""

import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from tqdm import tqdm

from littune.checkpoints import load_model_config
from littune.common import UserError, checked, first_line, load_torch, save_json, save_torch
from littune.model import build_model, check_adapter_fits, resolve_adapter

ExportFormat = Literal["hf", "peft", "gguf"]
ExportDtype = Literal["float32", "bfloat16", "float16", "q8_0"]
# files of a converted folder that describe the tokenizer and generation, copied into every output that has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
FAMILIES = "Llama/Mistral, Falcon and GPT-NeoX"
# the HF name of the output layer, per family (left out of a transformers folder when it is tied to the embedding)
# written into every export and merge folder: the files littune wrote there (what --overwrite may replace)
OUTPUT_RECORD = "littune_export.json"
HEAD_NAMES = {"llama": "lm_head.weight", "gpt_neox": "embed_out.weight", "falcon": "lm_head.weight"}


# ----------------------------------------------------------------------------------------------------- commands


@checked
def merge(checkpoint_dir: Path, adapter_path: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Fold a LoRA run into the base weights: a converted checkpoint folder to use without --adapter_path.

    Arguments:
        checkpoint_dir: The converted base model the run was trained on.
        adapter_path: A LoRA run folder (its final weights) or a LoRA weights file.
        out_dir: The folder to write (lit_model.pth, model_config.yaml, tokenizer files, prompt_style.yaml).
        overwrite: Replace an earlier export or merge in --out_dir (a folder holding other files is refused).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    config = load_model_config(checkpoint_dir)
    adapter = read_adapter(adapter_path, checkpoint_dir)
    check_out_dir(out_dir, overwrite, [checkpoint_dir, adapter["run_dir"]])
    base = load_base(checkpoint_dir, config)
    state = merged_state(config, base, adapter)
    with building(out_dir, "merge") as tmp:
        print(f"Writing {out_dir / 'lit_model.pth'}", file=sys.stderr)
        save_torch(state, tmp / "lit_model.pth")
        shutil.copyfile(checkpoint_dir / "model_config.yaml", tmp / "model_config.yaml")
        copy_tokenizer_files(checkpoint_dir, tmp)
        style = adapter["run_dir"] / "prompt_style.yaml"
        if style.is_file():  # the prompt format the run was trained with goes with its weights
            shutil.copyfile(style, tmp / "prompt_style.yaml")
        save_json({"base": str(checkpoint_dir.resolve()), "adapter": str(adapter["file"].resolve()),
                   "method": adapter["method"].name, **asdict(adapter["args"])}, tmp / "merge.json")
    print(f"Merged {adapter['file']} into {checkpoint_dir}: {out_dir} (use it as --checkpoint_dir, no --adapter_path)",
          file=sys.stderr)
    return out_dir


@checked
def export(
    checkpoint_dir: Path,
    format: ExportFormat,
    out_dir: Path,
    adapter_path: Optional[Path] = None,
    dtype: Optional[ExportDtype] = None,
    max_shard_size: str = "50GB",
    overwrite: bool = False,
) -> Path:
    """Write the model (with a LoRA run merged in) for transformers, PEFT or llama.cpp.

    Arguments:
        checkpoint_dir: A converted checkpoint folder (from littune download/convert, or littune merge).
        format: hf (a transformers folder, the LoRA merged in), peft (the LoRA alone, for PEFT/vLLM), gguf (one
            .gguf file for llama.cpp and Ollama; Llama-family models).
        out_dir: The folder to write.
        adapter_path: A LoRA run folder or weights file (required for peft; hf and gguf merge it in).
        dtype: The weights' dtype: float32, bfloat16, float16, or (gguf) q8_0 (default: the checkpoint's dtype for hf
            and peft; float16 for gguf, as llama.cpp's converter).
        max_shard_size: hf: split model.safetensors into shards of at most this size (e.g. 5GB, 500MB), with
            model.safetensors.index.json, as transformers' save_pretrained does (its default is 50GB).
        overwrite: Replace an earlier export or merge in --out_dir (a folder holding other files is refused).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    shard_bytes = parse_size(max_shard_size)
    if dtype == "q8_0" and format != "gguf":
        raise UserError(f"--dtype q8_0 is a GGUF type; --format {format} takes float32, bfloat16 or float16")
    if format == "peft" and adapter_path is None:
        raise UserError("--format peft writes a LoRA adapter: give the run with --adapter_path")
    config = load_model_config(checkpoint_dir)
    family = check_family(config, checkpoint_dir, format)
    adapter = read_adapter(adapter_path, checkpoint_dir) if adapter_path is not None else None
    if format == "gguf":
        tokenizer = gguf_tokenizer(checkpoint_dir, config)  # refuses a tokenizer llama.cpp could not read first
    check_out_dir(out_dir, overwrite, [checkpoint_dir] + ([adapter["run_dir"]] if adapter else []))

    if format == "peft":
        tensors, adapter_config = peft_adapter(config, family, adapter, checkpoint_dir, dtype)
        with building(out_dir, "export peft") as tmp:
            write_safetensors(tensors, tmp / "adapter_model.safetensors", None)
            save_json(adapter_config, tmp / "adapter_config.json")
            copy_tokenizer_files(checkpoint_dir, tmp)
        print(f"Wrote the PEFT adapter to {out_dir} (r={adapter_config['r']}, lora_alpha="
              f"{adapter_config['lora_alpha']}, {len(tensors)} tensors); load it onto the original model with "
              f"PeftModel.from_pretrained", file=sys.stderr)
        return out_dir

    base = load_base(checkpoint_dir, config)
    state = merged_state(config, base, adapter) if adapter else base
    if format == "hf":
        with building(out_dir, "export hf") as tmp:
            write_hf(tmp, config, family, state, checkpoint_dir, dtype, shard_bytes)
        print(f"Wrote a transformers model to {out_dir}", file=sys.stderr)
    else:
        with building(out_dir, "export gguf") as tmp:
            path = write_gguf(tmp, config, state, checkpoint_dir, tokenizer, dtype or "float16")
        print(f"Wrote {out_dir / path.name}", file=sys.stderr)
    return out_dir


# ---------------------------------------------------------------------------------------------- reading inputs


def read_adapter(adapter_path: Path, checkpoint_dir: Path) -> dict:
    """The trained weights of a run that can be merged, checked against the base model: file, run_dir, method,
    args, weights."""
    adapter_file, run_dir, method, method_args = resolve_adapter(adapter_path)
    if method.merge is None:
        raise UserError(
            f"--adapter_path {adapter_path}: an {method.name} run cannot be merged or exported: its learned prefix is "
            f"attended to as extra keys and values, which no base weight can hold; train with `littune finetune lora` "
            f"to export"
        )
    weights = load_torch(adapter_file, "adapter weights")
    check_adapter_fits(weights, adapter_file, checkpoint_dir, method, method_args)
    return {"file": adapter_file, "run_dir": run_dir, "method": method, "args": method_args, "weights": weights}


def load_base(checkpoint_dir: Path, config) -> dict:
    """lit_model.pth (memory-mapped), checked against model_config.yaml."""
    from litgpt import GPT

    path = Path(checkpoint_dir) / "lit_model.pth"
    state = load_torch(path, "base weights")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        raise UserError(f"{path}: weights do not fit {Path(checkpoint_dir) / 'model_config.yaml'} ({wrong[0]}); "
                        f"convert the checkpoint again")
    return state


def merged_state(config, base: dict, adapter: dict) -> dict:
    """The base state dict (Lit-GPT names) with the adapter's update folded in by its method's `merge`."""
    method = adapter["method"]
    with torch.device("meta"):
        model = build_model(config, method, adapter["args"])
    # assign: the module takes the (memory-mapped) tensors as they are, no copy of the whole model
    model.load_state_dict({**base, **adapter["weights"]}, strict=True, assign=True)
    method.merge(model)
    merged = {}
    for name, value in model.state_dict().items():
        if method.is_trainable(name):
            continue
        base_name = name.replace(".linear.", ".")  # litgpt's method models wrap each base Linear as `.linear`
        if base_name not in base:
            raise UserError(f"{adapter['file']}: the merged weight {name} has no place in the base model")
        merged[base_name] = value
    return merged


def check_out_dir(out_dir: Path, overwrite: bool, inputs: list) -> None:
    """--out_dir must be new, empty, or (with --overwrite) hold only what an earlier export or merge wrote there:
    --overwrite replaces littune's own output, never a folder that holds a user's other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file; give a folder")
    for source in inputs:
        source = Path(source).resolve()
        if source == out_dir.resolve() or out_dir.resolve() in source.parents:
            raise UserError(f"--out_dir {out_dir} holds the input {source}; write somewhere else")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out_dir {out_dir} exists and is not empty; choose another folder or pass --overwrite")
    foreign = foreign_entries(out_dir)
    if foreign:
        names = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise UserError(f"--out_dir {out_dir} holds files that no littune export or merge wrote ({names}); --overwrite "
                        f"replaces only littune's own output: choose another folder, or move those files away")


def foreign_entries(folder: Path) -> list[str]:
    """The names in folder that its littune_export.json (written by every export and merge) does not list as a plain
    file: all of them where there is no such record or it cannot be read."""
    names = sorted(p.name for p in folder.iterdir())
    try:
        record = json.loads((folder / OUTPUT_RECORD).read_text(encoding="utf-8"))
        ours = {str(name) for name in record["files"]} | {OUTPUT_RECORD}
    except (OSError, ValueError, KeyError, TypeError):
        return names
    return [name for name in names
            if name not in ours or (folder / name).is_symlink() or not (folder / name).is_file()]


@contextmanager
def building(out_dir: Path, command: str) -> Iterator[Path]:
    """A temporary folder beside out_dir, renamed onto it when the block succeeds (the old folder removed only
    then); on failure it is deleted and out_dir stays as it was. littune_export.json lists the files written, so a
    later --overwrite can tell littune's output from a user's files."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; the folder gets the mode a plain mkdir would give
    old = None
    try:
        yield tmp
        save_json({"command": command, "files": sorted(p.name for p in tmp.iterdir())}, tmp / OUTPUT_RECORD)
        if out_dir.exists():
            old = out_dir.with_name(f"{tmp.name}.old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer_files(checkpoint_dir: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(checkpoint_dir) / name).is_file():
            shutil.copyfile(Path(checkpoint_dir) / name, folder / name)


def parse_size(size: str) -> int:
    """"5GB" -> 5_000_000_000 (decimal units, as transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", str(size).upper())
    if not m or float(m[1]) <= 0:
        raise UserError(f"--max_shard_size {size!r}: give a size such as 5GB, 500MB or 2000000000 (bytes)")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
    return int(float(m[1]) * unit[m[2]])


def torch_dtype(name: Optional[str], state: dict) -> torch.dtype:
    return getattr(torch, name) if name else state["transformer.wte.weight"].dtype


# ---------------------------------------------------------------------------------------- families and configs


def model_family(config) -> Optional[str]:
    """The transformers family a Lit-GPT config is written as: its MLP, norm and residual layout decide."""
    if config.mlp_class_name == "LLaMAMLP" and config.norm_class_name == "RMSNorm" and not config.parallel_residual:
        return "llama"
    if config.mlp_class_name == "GptNeoxMLP" and config.norm_class_name == "LayerNorm":
        return "gpt_neox" if config.bias else "falcon"  # Falcon (as littune converts it) has no linear biases
    return None


def check_family(config, checkpoint_dir: Path, format: str) -> str:
    """The family, or a UserError when the format cannot hold this model (the config.json written for it must
    convert back to the very same Lit-GPT config, and GGUF is written for Llama-family models only)."""
    family = model_family(config)
    if family is None:
        raise UserError(f"{checkpoint_dir}: {config.name} ({config.mlp_class_name}) cannot be exported to --format "
                        f"{format}; littune exports {FAMILIES} models")
    differs = round_trip_differences(config, family)
    if differs:
        raise UserError(f"{checkpoint_dir}: {config.name} cannot be written as a transformers {family} model "
                        f"({', '.join(differs[:3])} would change); littune exports {FAMILIES} models as littune "
                        f"converts them")
    if format == "gguf" and family != "llama":
        raise UserError(f"{checkpoint_dir}: --format gguf writes Llama-family models (Llama, Mistral, SmolLM, ...); "
                        f"{config.name} is {family}: use --format hf")
    if format == "gguf" and config.sliding_window_size is not None:
        raise UserError(f"{checkpoint_dir}: {config.name} uses sliding-window attention, which llama.cpp's llama "
                        f"architecture does not apply: use --format hf")
    return family


# Lit-GPT config fields that are not part of the architecture: names, and the vocabulary before padding
NOT_ARCHITECTURE = {"name", "hf_config", "vocab_size", "padding_multiple"}


def round_trip_differences(config, family: str) -> list[str]:
    """Fields of the Lit-GPT config that `littune convert` would read back differently from the config.json
    `hf_config` writes (an architecture transformers' class for the family does not have)."""
    from litgpt import Config

    from littune.checkpoints.hf import config_from_hf

    back = Config(**config_from_hf(hf_config(config, family, tied=False, dtype=torch.float32), family, config.name))
    mine, theirs = asdict(config), asdict(back)
    differs = [f"{k} {mine[k]!r}" for k in mine if k not in NOT_ARCHITECTURE and mine[k] != theirs.get(k)]
    if family == "gpt_neox" and not config.bias:
        differs.append("bias False")  # transformers' GPT-NeoX MLP always has biases
    return differs


def hf_config(config, family: str, tied: bool, dtype: torch.dtype, token_ids: Optional[dict] = None) -> dict:
    """config.json for transformers: the inverse of `littune.checkpoints.hf.config_from_hf`. Rope settings are
    written both in transformers 5's `rope_parameters` and in the older flat keys, which 4.x reads."""
    dtype_name = str(dtype).removeprefix("torch.")
    rope = {"rope_type": "default", "rope_theta": float(config.rope_base)}
    common = {
        "vocab_size": config.padded_vocab_size,  # the embedding's rows, as the weights have them
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "max_position_embeddings": config.block_size,
        "tie_word_embeddings": tied,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        **(token_ids or {}),
    }
    if family == "gpt_neox":
        rope["partial_rotary_factor"] = config.rotary_percentage
        return {
            "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **common,
            "intermediate_size": config.intermediate_size,
            "hidden_act": "gelu" if config.gelu_approximate == "none" else "gelu_pytorch_tanh",
            "rotary_pct": config.rotary_percentage, "rotary_emb_base": config.rope_base, "rope_parameters": rope,
            "layer_norm_eps": config.norm_eps, "use_parallel_residual": config.parallel_residual,
            "attention_bias": config.bias,
        }
    if family == "falcon":
        new_arch = not config.shared_attention_norm
        return {
            "architectures": ["FalconForCausalLM"], "model_type": "falcon", **common,
            "new_decoder_architecture": new_arch, "multi_query": config.n_query_groups == 1,
            "num_kv_heads": config.n_query_groups, "parallel_attn": True, "bias": False, "alibi": False,
            "ffn_hidden_size": config.intermediate_size, "activation": "gelu", "layer_norm_epsilon": config.norm_eps,
            "rope_theta": config.rope_base, "rope_parameters": rope,
        }
    sliding = config.sliding_window_size
    return {
        "architectures": ["MistralForCausalLM" if sliding else "LlamaForCausalLM"],
        "model_type": "mistral" if sliding else "llama", **common,
        "intermediate_size": config.intermediate_size, "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base, "rope_parameters": rope, "attention_bias": False, "mlp_bias": False,
        **({"sliding_window": sliding} if sliding else {}),
    }


def lit_to_hf(config, family: str, state: dict) -> dict:
    """Lit-GPT names -> transformers names with litgpt's own copiers (q/k/v split for Llama, re-interleaved for
    GPT-NeoX and Falcon)."""
    from litgpt.scripts import convert_lit_checkpoint as lit_convert

    out = {}
    if family == "llama":
        lit_convert.copy_weights_llama(config, out, state)
    elif family == "gpt_neox":
        lit_convert.copy_weights_gpt_neox(config, out, state)
    else:  # litgpt's Falcon copier picks its norm names from "7b"/"40b" in the config name (as hf._copier)
        style = "falcon-40b" if not config.shared_attention_norm else "falcon-7b"
        lit_convert.copy_weights_falcon(replace(config, name=style), out, state)
    return out


def token_ids(checkpoint_dir: Path) -> dict:
    """bos/eos (and pad) ids for config.json: generation_config.json's, else the tokenizer's."""
    path = Path(checkpoint_dir) / "generation_config.json"
    ids = {}
    if path.is_file():
        try:
            generation = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e.msg}); restore it from the model's files") from e
        ids = {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in generation}
    if "bos_token_id" not in ids or "eos_token_id" not in ids:
        from litgpt import Tokenizer

        tokenizer = Tokenizer(checkpoint_dir)
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, **ids}
    return {k: v for k, v in ids.items() if v is not None}


# ---------------------------------------------------------------------------------------------- hf (transformers)


def write_hf(folder: Path, config, family: str, state: dict, checkpoint_dir: Path, dtype_name: Optional[str],
             shard_bytes: int) -> None:
    dtype = torch_dtype(dtype_name, state)
    # tied embeddings stay tied unless the LoRA changed the head (then its merged weight differs and is written)
    tied = torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    tensors = lit_to_hf(config, family, state)
    if tied:
        del tensors[HEAD_NAMES[family]]
    write_safetensors(tensors, folder / "model.safetensors", dtype, shard_bytes)
    ids = token_ids(checkpoint_dir)
    save_json(hf_config(config, family, tied, dtype, ids), folder / "config.json")
    copy_tokenizer_files(checkpoint_dir, folder)
    if not (folder / "generation_config.json").is_file():
        save_json(ids, folder / "generation_config.json")


def write_safetensors(tensors: dict, path: Path, dtype: Optional[torch.dtype], shard_bytes: Optional[int] = None):
    """tensors as path, or above shard_bytes as numbered shards plus path.index.json, split by huggingface_hub's
    splitter as transformers' save_pretrained does (same order, names, and a tensor bigger than the limit alone)."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    def size(t):
        return t.numel() * (dtype or t.dtype).itemsize

    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=size, max_shard_size=shard_bytes or float("inf"),
        filename_pattern=path.name.replace(".safetensors", "{suffix}.safetensors"))
    with tqdm(total=len(tensors), desc=f"Writing {path.name}", unit="tensor", file=sys.stderr) as bar:
        for file_name, keys in split.filename_to_tensors.items():
            # copies: safetensors refuses tensors that share memory (the q/k/v views of one qkv weight)
            shard = {k: tensors[k].to(dtype=dtype or tensors[k].dtype, copy=True).contiguous() for k in keys}
            save_file(shard, str(path.parent / file_name), metadata={"format": "pt"})
            bar.update(len(keys))
            del shard
    if split.is_sharded:
        save_json({"metadata": split.metadata, "weight_map": split.tensor_to_filename},
                  path.parent / f"{path.name}.index.json")


# ------------------------------------------------------------------------------------------------------- peft


def peft_adapter(config, family: str, adapter: dict, checkpoint_dir: Path, dtype_name: Optional[str]) -> tuple:
    """(tensors with PEFT's names, adapter_config.json) for a LoRA run.

    Each LoRA layer's update B @ A * alpha / r is written for the transformers module whose weight litgpt's copier
    makes of it. litgpt's fused qkv LoRA has its own A and B per projection (`lora.qkv_parts`); for Llama they
    become q_proj/k_proj/v_proj adapters of rank r. For GPT-NeoX and Falcon the fused query_key_value is one
    module: its A stacks the projections' A's and its B places each projection's B in that projection's rows
    (zero elsewhere), rank r x (projections with LoRA), so B @ A is exactly litgpt's update, and the rows are
    re-interleaved by the same copier as the base weight. Every module is written with one rank (smaller ones
    padded with zero rows/columns, which add nothing) and alpha scaled with it, because vLLM and llama.cpp read one
    r and lora_alpha from adapter_config.json.
    """
    from littune.methods.lora import lora_modules, qkv_parts

    method, args = adapter["method"], adapter["args"]
    with torch.device("meta"):
        model = build_model(config, method, args)
    model.load_state_dict(adapter["weights"], strict=False, assign=True)
    modules = {}  # transformers module name -> (A, B)
    for name, module in lora_modules(model):
        if hasattr(module, "enable_lora"):  # the fused qkv
            parts = qkv_parts(module)
            a = torch.cat([p[1] for p in parts])
            b = torch.zeros(module.linear.out_features, a.shape[0], dtype=a.dtype)
            used = torch.zeros(module.linear.out_features, a.shape[0], dtype=torch.bool)
            for i, (_, _, part_b, rows) in enumerate(parts):
                b[rows, i * module.r:(i + 1) * module.r] = part_b
                used[rows, i * module.r:(i + 1) * module.r] = True
        else:
            a, b = module.lora_A, module.lora_B
            used = torch.ones_like(b, dtype=torch.bool)
        # which rows of the fused Lit weight each transformers weight takes: litgpt's copier run on row numbers
        row_numbers = torch.arange(module.linear.out_features, dtype=torch.float64).unsqueeze(1)
        for hf_name, rows in lit_to_hf(config, family, {f"{name}.weight": row_numbers}).items():
            rows = rows[:, 0].long()
            columns = used[rows].any(0)
            if columns.any():  # a projection without LoRA (e.g. k_proj when key is not a target) gets none
                modules[hf_name.removesuffix(".weight")] = (a[columns], b[rows][:, columns])
    rank = max(a.shape[0] for a, _ in modules.values())
    tensors = {}
    for hf_module, (a, b) in modules.items():
        pad = rank - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        dtype = getattr(torch, dtype_name) if dtype_name else a.dtype  # default: as trained
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a.to(dtype)
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = b.to(dtype)
    hf = config.hf_config or {}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": f"{hf['org']}/{hf['name']}" if hf.get("org") else str(checkpoint_dir),
        "r": rank,
        "lora_alpha": args.lora_alpha * rank // args.lora_r,  # alpha / r, the scale of the update, unchanged
        "lora_dropout": args.lora_dropout,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    return tensors, adapter_config


# ------------------------------------------------------------------------------------------------------- gguf

# gguf.LlamaFileType and the tensor type of the 2-D weights, per --dtype
GGUF_TYPES = {"float32": ("ALL_F32", "F32"), "float16": ("MOSTLY_F16", "F16"), "bfloat16": ("MOSTLY_BF16", "BF16"),
              "q8_0": ("MOSTLY_Q8_0", "Q8_0")}
GGUF_SUFFIX = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}
# llama.cpp's pre-tokenizer names for the pre-tokenizers littune's GGUF import rebuilds, in the order preferred
PRE_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2")


def hf_to_gguf_name(hf_name: str) -> str:
    """The inverse of littune's GGUF import names (`littune.checkpoints.gguf`)."""
    from littune.checkpoints.gguf import _BLOCK_NAMES, _TOP_NAMES

    top = {v: k for k, v in _TOP_NAMES.items()}
    if hf_name in top:
        return top[hf_name]
    block = {v: k for k, v in _BLOCK_NAMES.items()}
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
    from littune.checkpoints.gguf import PRE_TOKENIZERS

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


def write_gguf(folder: Path, config, state: dict, checkpoint_dir: Path, tokenizer: dict, dtype_name: str) -> Path:
    """One .gguf file in folder, written tensor by tensor (the header first, from the tensors' sizes)."""
    import numpy as np

    from littune.checkpoints.gguf import _import_gguf

    gguf = _import_gguf()
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
    _gguf_metadata(gguf, writer, config, checkpoint_dir, tokenizer, getattr(gguf.LlamaFileType, file_type))
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


def _gguf_metadata(gguf, writer, config, checkpoint_dir: Path, tokenizer: dict, file_type) -> None:
    """The keys llama.cpp's converter writes for a LlamaForCausalLM (`TextModel.set_gguf_parameters`,
    `LlamaModel.set_gguf_parameters` and `set_vocab`)."""
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
    special.add_to_gguf(writer, quiet=True)
    tokenizer_config = Path(checkpoint_dir) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        value = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("add_prefix_space")
        if isinstance(value, bool):
            writer.add_add_space_prefix(value)
