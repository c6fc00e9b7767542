"""Convert a Hugging Face checkpoint folder to Lit-GPT format: `lit_model.pth` + `model_config.yaml`.

The weight-copying functions are litgpt's (`litgpt.scripts.convert_hf_checkpoint`). What littune adds: the Lit-GPT
config is built from the folder's `config.json` when the repo is not one of litgpt's named configs (fine-tuned
derivatives, small models; `configs.py`), tensors are read without trusting the files and streamed one at a time into
the output file (`weights.py`), and the result is checked against the model's expected parameter names and shapes
before it is renamed into place. A folder holding a GGUF file is handed to `gguf.py`.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

from tqdm import tqdm

from littune.checkpoints.configs import (ARCHITECTURES, config_from_hf, load_hf_config,  # noqa: F401  (the API)
                                         resolve_config, save_model_config)
from littune.checkpoints.gguf import convert_gguf, find_gguf_file
from littune.checkpoints.weights import (SafetensorsFile, check_state_dict, copier, find_weight_files, lazy_weights,
                                         load_bin)
from littune.common import UserError, atomic_path, first_line

TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
CONFIG_FILES = ["config.json", "generation_config.json"]


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
        dtype: Convert the weights to this dtype (default: keep the dtype of the files; for GGUF float32 up to 1B parameters, bfloat16 above).
        gguf_file: The .gguf file in the folder to convert (default: the folder's only .gguf file, when the folder
            has no HF weights).
    """
    import torch
    from litgpt.utils import incremental_save

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
            SafetensorsFile(weight_file).close()
    if family is None:  # a litgpt named config of a family littune does not stream (phi, gemma, qwen, ...)
        _convert_with_litgpt(checkpoint_dir, config, dtype)
        return
    copy_fn, state_dict = copier(family, config)
    total = sum(f.stat().st_size for f in weight_files)
    print(f"Converting {checkpoint_dir} ({config.name}, {total / 1e6:.1f} MB) to Lit-GPT format", file=sys.stderr)
    with atomic_path(checkpoint_dir / "lit_model.pth") as tmp:
        with incremental_save(tmp) as saver, tqdm(total=len(weight_files), desc="Converting", unit="file") as pbar:
            state_dict.saver = saver
            for weight_file in weight_files:
                copy_file(copy_fn, state_dict, weight_file, torch_dtype, config, family)
                pbar.update(1)
            tied = "lm_head.weight" not in state_dict and "transformer.wte.weight" in state_dict
            if tied:  # tied embeddings: the Hub file leaves the head out
                state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
            check_state_dict(config, state_dict, checkpoint_dir)
            saver.save(dict(state_dict))
    save_model_config(config, checkpoint_dir)
    print(f"Wrote {checkpoint_dir / 'lit_model.pth'} and {checkpoint_dir / 'model_config.yaml'}", file=sys.stderr)


def copy_file(copy_fn, state_dict, weight_file: Path, torch_dtype, config, family: str) -> None:
    """One weight file's tensors through litgpt's copier into state_dict, its errors as one line."""
    with lazy_weights(weight_file) as hf_weights:
        try:
            copy_fn(state_dict, hf_weights, saver=None, dtype=torch_dtype)
        except KeyError as e:  # litgpt's name map has no entry for this tensor
            raise UserError(
                f"{weight_file}: tensor {e.args[0]!r} is not part of a {config.name} ({family}) model; "
                f"is this the right --model_name / config.json?"
            ) from e
        except (RuntimeError, ValueError) as e:  # e.g. a q/k/v split that does not fit the head sizes
            raise UserError(f"{weight_file}: weights do not fit the {config.name} config ({first_line(e)})") from e


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
