"""Lit-GPT configs for Hugging Face checkpoints: a litgpt named config, or one built from the repo's `config.json`.

Order: --model_name, then the folder (repo) name as a litgpt config name, then config.json; a named config whose sizes
disagree with config.json is not used (a derivative or a small test model that reuses a famous name). config.json
comes from someone else's repo: it must be a JSON object, and the sizes read from it must be positive integers.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import yaml

from littune.common import UserError, atomic_path, first_line

CONFIG_MAX_BYTES = 16 << 20  # a config.json is a few KB

# HF `architectures` entries littune builds a Lit-GPT config for from config.json, by family.
ARCHITECTURES = {
    "GPTNeoXForCausalLM": "gpt_neox",
    "FalconForCausalLM": "falcon",
    "RWForCausalLM": "falcon",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}


def load_hf_config(checkpoint_dir: Path) -> Optional[dict]:
    path = Path(checkpoint_dir) / "config.json"
    return read_hf_config(path, str(path)) if path.is_file() else None


def read_hf_config(path: Path, where: str) -> dict:
    """A config.json's object; a UserError naming `where` if the file is too large, not JSON or not an object."""
    if path.stat().st_size > CONFIG_MAX_BYTES:
        raise UserError(f"{where}: {path.stat().st_size:,} bytes, too large for a config.json")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not isinstance(hf, dict):
        raise UserError(f"{where}: a JSON {type(hf).__name__}, not the object a config.json holds")
    return hf


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
    named = named_config(name)
    if model_name and named is None:
        raise UserError(f"--model_name {model_name!r} is not a litgpt config (`littune models` lists them)")
    if named is not None and (hf is None or sizes_match(named, hf)):
        return named, family if hf else _family_of_named(named)
    if hf is None:
        raise UserError(f"{where}: no config.json and {name!r} is not a litgpt config name; pass --model_name")
    if family is None:
        arch = ", ".join(map(str, _architectures(hf) or [hf.get("model_type")]))
        raise UserError(
            f"{where}: cannot convert architecture {arch}; littune converts "
            f"{', '.join(sorted(ARCHITECTURES))} from config.json, or a litgpt named config via --model_name"
        )
    kwargs = _config_kwargs(hf, family, name, where)
    try:
        return Config(**kwargs), family
    except (TypeError, ValueError, AssertionError, ZeroDivisionError) as e:  # litgpt's own checks of the sizes
        raise UserError(f"{where}: config.json does not make a Lit-GPT config ({type(e).__name__}: "
                        f"{first_line(e)})") from e


def check_convertible(hf: Optional[dict], name: str, model_name: Optional[str], where: str) -> None:
    """Raise the UserError `config_for` would, importing litgpt (seconds) only when config.json alone cannot tell."""
    family = _family(hf) if hf else None
    if family and not model_name:
        try:
            _config_kwargs(hf, family, name, where)
            return
        except UserError:
            pass  # a litgpt named config may still fit
    config_for(hf, name, model_name, where)


# config.json keys that are sizes (counts of things): positive integers where present
SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
             "max_position_embeddings", "head_dim", "num_key_value_heads", "num_kv_heads", "ffn_hidden_size",
             "sliding_window")


def _config_kwargs(hf: dict, family: str, name: str, where: str) -> dict:
    for key in SIZE_KEYS:
        value = hf.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise UserError(f"{where}: config.json {key}={value!r} is not a positive integer")
    try:
        return config_from_hf(hf, family, name)
    except KeyError as e:
        raise UserError(f"{where}: config.json has no {e.args[0]!r}, which a {family} model needs") from e
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong kind (a string for a number, ...)
        raise UserError(f"{where}: config.json has a value of the wrong kind ({type(e).__name__}: "
                        f"{first_line(e)})") from e


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


def named_config(name: str):
    from litgpt import Config
    from litgpt.config import name_to_config

    match = name if name in name_to_config else next((n for n in name_to_config if n.lower() == name.lower()), None)
    return Config.from_name(match) if match else None


def _family(hf: dict) -> Optional[str]:
    for arch in _architectures(hf):
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf.get("model_type")
    return {"gpt_neox": "gpt_neox", "falcon": "falcon", "RefinedWebModel": "falcon", "llama": "llama",
            "mistral": "llama"}.get(model_type) if isinstance(model_type, str) else None


def _architectures(hf: dict) -> list:
    """config.json's `architectures`, the strings in it (the file may hold anything there)."""
    found = hf.get("architectures")
    return [a for a in found if isinstance(a, str)] if isinstance(found, list) else []


def _family_of_named(config) -> Optional[str]:
    if "falcon" in config.name.lower() and "falcon3" not in config.name.lower():
        return "falcon"
    if config.mlp_class_name == "GptNeoxMLP" and config.name.lower().startswith("pythia"):
        return "gpt_neox"
    if config.mlp_class_name == "LLaMAMLP" and config.name.lower().startswith(("llama-2", "mistral", "tinyllama")):
        return "llama"
    return None


def sizes_match(config, hf: dict) -> bool:
    return (
        config.n_layer == hf.get("num_hidden_layers", hf.get("n_layer"))
        and config.n_embd == hf.get("hidden_size", hf.get("n_embd"))
        and config.padded_vocab_size == hf.get("vocab_size")
    )


def _rope(hf: dict) -> tuple[float, float]:
    """(theta, fraction of the head rotated), from transformers 5's rope_parameters or the older flat keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise UserError("config.json rope_parameters / rope_scaling is not an object")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UserError(f"rope scaling {rope_type!r} in config.json cannot be converted (only default RoPE)")
    theta = params.get("rope_theta") or hf.get("rope_theta") or hf.get("rotary_emb_base") or 10000
    fraction = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or hf.get("rotary_pct") or 1.0
    theta, fraction = float(theta), float(fraction)
    if not (theta > 0 and 0 < fraction <= 1):
        raise UserError(f"config.json rope theta {theta} / rotary fraction {fraction} out of range")
    return theta, fraction


def _require(hf: dict, key: str, allowed: tuple) -> None:
    if hf.get(key) not in allowed:
        raise UserError(f"config.json {key}={hf.get(key)!r} cannot be converted (supported: {', '.join(allowed)})")
