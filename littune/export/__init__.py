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

hf, peft and gguf exports of a run carry a chat template that writes the run's prompt (its style, system message
and BOS rule) from one user message, so that the exported model is prompted as it was trained (`template.py`); an
export of a base model keeps the base's template.

One file per format, registered in `formats.py` (FORMATS: adding a format is a file and a line): `hf.py` (also the
model families and config.json every format shares), `peft.py`, `gguf.py`; `template.py` (the chat template),
`card.py` (the model card).
This is the inference side: it never imports the training package.
"""

import json
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import torch

from littune.common import UserError, atomic_folder, checked, load_torch, save_json, save_torch
from littune.export.formats import FORMATS, ExportDtype, ExportJob, FormatName, get_format
from littune.export.hf import check_family, copy_tokenizer_files
from littune.export.template import chat_template, run_prompt
from littune.inputs import RunInputs
from littune.model import build_model

# written into every export and merge folder: the files littune wrote there (what --overwrite may replace)
OUTPUT_RECORD = "littune_export.json"


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
    inputs = RunInputs(checkpoint_dir, adapter_path=adapter_path)
    config = inputs.config
    adapter = read_adapter(inputs)
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
    format: FormatName,
    out_dir: Path,
    adapter_path: Optional[Path] = None,
    dtype: Optional[ExportDtype] = None,
    max_shard_size: str = "50GB",
    card_example: bool = True,
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
        card_example: The model card (README.md) shows one record of the run's test split as the prompt example
            (its text as it is: false for private data, the card shows the prompt's shape instead).
        overwrite: Replace an earlier export or merge in --out_dir (a folder holding other files is refused).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    chosen = get_format(format)
    shard_bytes = parse_size(max_shard_size)
    if dtype is not None and dtype not in chosen.dtypes:
        takes = [name for name in FORMATS if dtype in get_format(name).dtypes]
        raise UserError(f"--dtype {dtype} is a {'/'.join(name.upper() for name in takes)} type; --format {format} "
                        f"takes {', '.join(chosen.dtypes[:-1])} or {chosen.dtypes[-1]}")
    if chosen.needs_adapter and adapter_path is None:
        raise UserError(chosen.needs_adapter)
    inputs = RunInputs(checkpoint_dir, adapter_path=adapter_path)
    config = inputs.config
    family = check_family(config, checkpoint_dir, format)
    chosen.check(config, checkpoint_dir, family)
    adapter = read_adapter(inputs) if adapter_path is not None else None
    prepared = chosen.prepare(checkpoint_dir, config)
    run_dir = adapter["run_dir"] if adapter else merged_run(checkpoint_dir)
    # the run's prompt as a chat template (none for a base model: its own template stays)
    prompt = run_prompt(run_dir, checkpoint_dir, lambda: inputs.tokenizer)
    template = chat_template(prompt, gguf=chosen.gguf_template) if prompt is not None else None
    check_out_dir(out_dir, overwrite, [checkpoint_dir] + ([adapter["run_dir"]] if adapter else []))

    job = ExportJob(checkpoint_dir, out_dir, config, family, adapter, run_dir, prompt, template, dtype, shard_bytes,
                    card_example=card_example, prepared=prepared, tokenizer=lambda: inputs.tokenizer)
    if chosen.merged:
        base = load_base(checkpoint_dir, config)
        job.state = merged_state(config, base, adapter) if adapter else base
    with building(out_dir, f"export {format}") as tmp:
        done = chosen.write(job, tmp)
    print(done, file=sys.stderr)
    return out_dir


def read_adapter(inputs: RunInputs) -> dict:
    """The trained weights of a run that can be merged, checked against the base model: file, run_dir, method,
    args, weights."""
    adapter = inputs.adapter
    if adapter.method.merge is None:
        raise UserError(
            f"--adapter_path {inputs.adapter_path}: an {adapter.method.name} run cannot be merged or exported: its "
            f"learned prefix is attended to as extra keys and values, which no base weight can hold; train with "
            f"`littune finetune lora` to export"
        )
    weights = inputs.adapter_weights(adapter)
    return {"file": adapter.file, "run_dir": adapter.run_dir, "method": adapter.method, "args": adapter.args,
            "weights": weights}


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
        base_name = method.base_name(name)
        if base_name not in base:
            raise UserError(f"{adapter['file']}: the merged weight {name} has no place in the base model")
        merged[base_name] = value
    return merged


def merged_run(checkpoint_dir: Path) -> Optional[Path]:
    """The run folder a `littune merge` output was made from (its merge.json names the adapter), if it still exists."""
    try:
        adapter = Path(json.loads((Path(checkpoint_dir) / "merge.json").read_text(encoding="utf-8"))["adapter"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return adapter.parent if adapter.parent.is_dir() else None


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
    """The output folder, built whole in a temporary folder and swapped in (`common.atomic_folder`): a failed or
    interrupted command leaves out_dir as it was. littune_export.json lists the files written, so a later
    --overwrite can tell littune's output from a user's files."""
    with atomic_folder(out_dir) as tmp:
        yield tmp
        save_json({"command": command, "files": sorted(p.name for p in tmp.iterdir())}, tmp / OUTPUT_RECORD)


def parse_size(size: str) -> int:
    """"5GB" -> 5_000_000_000 (decimal units, as transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", str(size).upper())
    if not m or float(m[1]) <= 0:
        raise UserError(f"--max_shard_size {size!r}: give a size such as 5GB, 500MB or 2000000000 (bytes)")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
    return int(float(m[1]) * unit[m[2]])
