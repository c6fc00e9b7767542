"""Checkpoints: download from the Hugging Face Hub, convert to Lit-GPT format, validate a converted folder.

    littune download --repo_id tiiuae/falcon-7b      # checkpoints/tiiuae/falcon-7b/{HF files, lit_model.pth, model_config.yaml}
    littune convert --checkpoint_dir DIR              # an HF folder already on disk

- `hub.py`: the download (huggingface_hub), its errors as one line; names from the Hub checked before they are
  paths;
- `hf.py`: the `convert` command: streamed HF -> Lit conversion with litgpt's copiers;
- `configs.py`: Lit-GPT configs, named or built from `config.json`;
- `weights.py`: the weight files (index shards, safetensors headers checked, .bin with weights_only), the streamed
  state dict;
- `gguf.py`: GGUF files (llama.cpp's format, `--gguf_file`): dequantized weights, config and tokenizer files from the
  file's metadata, through the same streamed conversion; `gguf_header.py` reads the header (checked, bounded cost),
  `gguf_tokenizer.py` rebuilds the tokenizer from the metadata.

torch is imported inside the functions that use it, so that commands that fail early (or only download) start fast.
"""

from pathlib import Path

from littune.common import UserError, first_line


def load_model_config(checkpoint_dir: Path):
    """The Lit-GPT config of a converted checkpoint folder, or a UserError saying how to make one."""
    from litgpt import Config

    checkpoint_dir = Path(checkpoint_dir)
    check_checkpoint_dir(checkpoint_dir)
    path = checkpoint_dir / "model_config.yaml"
    try:
        return Config.from_file(path)
    except Exception as e:  # invalid YAML, not a mapping, or keys litgpt's Config does not have
        raise UserError(f"{path}: not a Lit-GPT model config ({type(e).__name__}: {first_line(e)}); convert the "
                        f"checkpoint again: littune convert --checkpoint_dir {checkpoint_dir}") from e


def check_checkpoint_dir(checkpoint_dir: Path) -> None:
    """A converted checkpoint folder has lit_model.pth, model_config.yaml and a tokenizer."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir}: no such checkpoint folder (littune download --repo_id ORG/NAME)")
    missing = [f for f in ("lit_model.pth", "model_config.yaml") if not (checkpoint_dir / f).is_file()]
    if missing:
        raise UserError(
            f"{checkpoint_dir}: no {' or '.join(missing)}; convert it first: littune convert --checkpoint_dir "
            f"{checkpoint_dir}"
        )
    if not any((checkpoint_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{checkpoint_dir}: no tokenizer.json or tokenizer.model")




from littune.checkpoints.configs import load_hf_config  # noqa: E402
from littune.checkpoints.hf import convert, models  # noqa: E402  (the commands)
from littune.checkpoints.hub import download  # noqa: E402

__all__ = ["check_checkpoint_dir", "convert", "download", "load_hf_config", "load_model_config", "models"]
