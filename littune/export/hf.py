"""`littune export --format hf`: a transformers folder; and what every format needs of the model family (which
family, config.json, Lit -> HF names, tokenizer files)."""

import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from littune.common import UserError, save_json
from littune.export.formats import ExportFormat

# files of a converted folder that describe the tokenizer and generation, copied into every output that has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
FAMILIES = "Llama/Mistral, Falcon and GPT-NeoX"
# the HF name of the output layer, per family (left out of a transformers folder when it is tied to the embedding)
HEAD_NAMES = {"llama": "lm_head.weight", "gpt_neox": "embed_out.weight", "falcon": "lm_head.weight"}
# Lit-GPT config fields that are not part of the architecture: names, and the vocabulary before padding
NOT_ARCHITECTURE = {"name", "hf_config", "vocab_size", "padding_multiple"}


def copy_tokenizer_files(checkpoint_dir: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(checkpoint_dir) / name).is_file():
            shutil.copyfile(Path(checkpoint_dir) / name, folder / name)


def torch_dtype(name: Optional[str], state: dict) -> torch.dtype:
    return getattr(torch, name) if name else state["transformer.wte.weight"].dtype


def model_family(config) -> Optional[str]:
    """The transformers family a Lit-GPT config is written as: its MLP, norm and residual layout decide."""
    if config.mlp_class_name == "LLaMAMLP" and config.norm_class_name == "RMSNorm" and not config.parallel_residual:
        return "llama"
    if config.mlp_class_name == "GptNeoxMLP" and config.norm_class_name == "LayerNorm":
        return "gpt_neox" if config.bias else "falcon"  # Falcon (as littune converts it) has no linear biases
    return None


def check_family(config, checkpoint_dir: Path, format: str) -> str:
    """The family, or a UserError when the formats cannot hold this model (the config.json written for it must
    convert back to the very same Lit-GPT config; a format's own limits are its FORMAT.check)."""
    family = model_family(config)
    if family is None:
        raise UserError(f"{checkpoint_dir}: {config.name} ({config.mlp_class_name}) cannot be exported to --format "
                        f"{format}; littune exports {FAMILIES} models")
    differs = round_trip_differences(config, family)
    if differs:
        raise UserError(f"{checkpoint_dir}: {config.name} cannot be written as a transformers {family} model "
                        f"({', '.join(differs[:3])} would change); littune exports {FAMILIES} models as littune "
                        f"converts them")
    return family


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


def token_ids(checkpoint_dir: Path, tokenizer: Callable) -> dict:
    """bos/eos (and pad) ids for config.json: generation_config.json's, else the tokenizer's (`tokenizer()`)."""
    path = Path(checkpoint_dir) / "generation_config.json"
    ids = {}
    if path.is_file():
        try:
            generation = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e.msg}); restore it from the model's files") from e
        ids = {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in generation}
    if "bos_token_id" not in ids or "eos_token_id" not in ids:
        loaded = tokenizer()
        ids = {"bos_token_id": loaded.bos_id, "eos_token_id": loaded.eos_id, **ids}
    return {k: v for k, v in ids.items() if v is not None}


def write_hf(folder: Path, config, family: str, state: dict, checkpoint_dir: Path, dtype_name: Optional[str],
             shard_bytes: int, tokenizer: Callable) -> None:
    dtype = torch_dtype(dtype_name, state)
    # tied embeddings stay tied unless the LoRA changed the head (then its merged weight differs and is written)
    tied = torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    tensors = lit_to_hf(config, family, state)
    if tied:
        del tensors[HEAD_NAMES[family]]
    write_safetensors(tensors, folder / "model.safetensors", dtype, shard_bytes)
    ids = token_ids(checkpoint_dir, tokenizer)
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


HF_LOAD = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
llama.cpp / Ollama: `littune export --format gguf` writes the GGUF file (Llama-family models), or run llama.cpp's
`convert_hf_to_gguf.py PATH` on this folder."""


def write(job, folder: Path) -> str:
    from littune.export.card import write_model_card
    from littune.export.template import write_chat_template

    write_hf(folder, job.config, job.family, job.state, job.checkpoint_dir, job.dtype, job.shard_bytes,
             job.tokenizer)
    if job.template is not None:
        write_chat_template(folder, job.template)
    write_model_card(folder, FORMAT, job.checkpoint_dir, job.config, job.run_dir, job.card_example)
    return f"Wrote a transformers model to {job.out_dir}"


FORMAT = ExportFormat(
    name="hf",
    summary="a transformers folder, the LoRA merged in",
    write=write,
    card_library="transformers",
    card_load=HF_LOAD,
)
