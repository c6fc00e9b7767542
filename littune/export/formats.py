"""Export formats: what `littune export --format NAME` writes, one file each (`hf.py`, `peft.py`, `gguf.py`), each
defining FORMAT. Adding a format = one file defining FORMAT + one line in FORMATS; `--format`'s choices and the
model card's loading section follow from here.

`littune export` does what every format shares (checks the family, reads the adapter, the run's prompt and chat
template, the output folder, merges the weights where the format takes them merged) and hands the format an
`ExportJob` to write into the folder being built.
"""

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Literal, Optional

# name -> module defining FORMAT
FORMATS = {
    "hf": "littune.export.hf",
    "peft": "littune.export.peft",
    "gguf": "littune.export.gguf",
}
FormatName = Literal[tuple(FORMATS)]
DTYPES = ("float32", "bfloat16", "float16", "q8_0")  # every format's --dtype choices together
ExportDtype = Literal[DTYPES]
TORCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ExportJob:
    """What an export writes from: checked and read before anything is written."""

    checkpoint_dir: Path
    out_dir: Path
    config: Any  # the Lit-GPT config
    family: str  # the transformers family (`hf.model_family`)
    adapter: Optional[dict]  # `export.read_adapter`'s, or None for a base model
    run_dir: Optional[Path]  # the run folder the weights come from (also of a `littune merge` output)
    prompt: Any  # the run's prompt rule (`template.run_prompt`), or None
    template: Optional[str]  # the chat template that writes the run's prompt, or None (the base's stays)
    dtype: Optional[str]  # --dtype, None: the format's default
    shard_bytes: int  # --max_shard_size in bytes
    card_example: bool = True  # the model card shows a test record as its prompt example
    state: Optional[dict] = None  # the full state dict (Lit-GPT names), the adapter merged in: formats that merge
    prepared: Any = None  # what the format's `prepare` returned
    tokenizer: Callable[[], Any] = None  # the checkpoint's tokenizer, loaded on first call and kept (`RunInputs`)


def _nothing(*args) -> None:
    return None


@dataclass(frozen=True)
class ExportFormat:
    """What differs between export formats."""

    name: str
    summary: str  # one line for --format's help
    write: Callable[[ExportJob, Path], str]  # (job, the folder being built) -> the line printed once it is in place
    merged: bool = True  # takes the full weights, the adapter merged in (job.state)
    needs_adapter: Optional[str] = None  # the refusal where --adapter_path is missing (a format of adapters only)
    dtypes: tuple = TORCH_DTYPES  # the --dtype values it takes
    gguf_template: bool = False  # its chat template is the one llama.cpp's engine renders (`template.chat_template`)
    # (config, checkpoint_dir, family) -> None: refuses a model it cannot hold, before the adapter is read
    check: Callable[[Any, Path, str], None] = _nothing
    # (checkpoint_dir, config) -> job.prepared: reads and checks its own inputs, before anything is written
    prepare: Callable[[Path, Any], Any] = _nothing
    # the model card (README.md) of the folder, None: it writes none
    card_library: Optional[str] = None  # the Hub's library_name
    card_intro: str = "A fine-tune of"  # the card's first words about a run
    card_load: str = ""  # the card's "How to load it" text; PATH: the folder, BASE: the base model's repo id


def get_format(name: str) -> ExportFormat:
    from littune.common import UserError

    if name not in FORMATS:
        raise UserError(f"unknown export format {name!r} (known: {', '.join(FORMATS)})")
    return import_module(FORMATS[name]).FORMAT
