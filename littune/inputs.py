"""A run's inputs, each read from disk once: the model config and the tokenizer of --checkpoint_dir, the prepared
data of --data_dir (prepare.json, its label set, its prompt style) and the trained adapter of --adapter_path.

Every command (finetune, evaluate, generate, serve, export) makes one `RunInputs` of its flags and takes what it
needs from it. Each input is read on first use and kept: a command that fails early has read nothing it did not
need, in the order it asks (the order of its error messages), and no input is read twice in a run. A new kind of
input (a quantized base, say) is one more property here.
"""

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

from littune.checkpoints import load_model_config
from littune.common import UserError, load_torch
from littune.model import Adapter, check_adapter_fits, check_data_fits_model, load_model, resolve_adapter
from littune.prepared import load_prepare_json, load_split, load_tokenizer
from littune.prompts import STYLE_FILE, choose_prompt_style, load_style_file, read_tokenizer_config


@dataclass(eq=False)
class RunInputs:
    """The flags that name a run's inputs; the inputs themselves as properties, loaded once."""

    checkpoint_dir: Path
    data_dir: Optional[Path] = None
    adapter_path: Optional[Path] = None

    def __post_init__(self):
        self.checkpoint_dir = Path(self.checkpoint_dir)
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else None
        self.adapter_path = Path(self.adapter_path) if self.adapter_path is not None else None

    # ------------------------------------------------------------------------------------------ the checkpoint

    @cached_property
    def config(self):
        """The Lit-GPT config (model_config.yaml)."""
        return load_model_config(self.checkpoint_dir)

    @cached_property
    def tokenizer(self):
        """litgpt's Tokenizer, checked (`prepared.load_tokenizer`)."""
        return load_tokenizer(self.checkpoint_dir)

    @cached_property
    def tokenizer_config(self) -> dict:
        """tokenizer_config.json ({} where there is none): its chat template and special tokens."""
        return read_tokenizer_config(self.checkpoint_dir)

    # --------------------------------------------------------------------------------------- the prepared data

    @cached_property
    def meta(self) -> dict:
        """prepare.json."""
        return load_prepare_json(self._data_dir())

    @property
    def labels(self) -> Optional[list]:
        """The label set prepare recorded, None for free-text outputs."""
        return self.meta.get("labels")

    @cached_property
    def label_sets(self) -> Optional[dict]:
        """A multi-label task's {"labels", "none_label"} (`littune.label_sets`), None for any other; a prepare.json
        whose entry is not that shape is refused in one line."""
        value = self.meta.get("label_sets")
        if value is None:
            return None
        labels = value.get("labels") if isinstance(value, dict) else None
        none = value.get("none_label") if isinstance(value, dict) else None
        if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)
                and (none is None or isinstance(none, str))):
            raise UserError(f"{self._data_dir() / 'prepare.json'}: label_sets is not {{\"labels\": [names], "
                            f"\"none_label\": name or null}}; prepare the data again")
        return {"labels": labels, "none_label": none}

    @property
    def ignore_index(self) -> int:
        return int(self.meta.get("ignore_index", -100))

    @cached_property
    def style_text(self) -> str:
        """prompt_style.yaml as written (a run folder keeps a copy of it)."""
        return (self._data_dir() / STYLE_FILE).read_text(encoding="utf-8")

    @cached_property
    def data_style(self):
        """The prompt style the data was prepared with."""
        return load_style_file(self._data_dir())

    def split(self, name: str) -> list:
        """The records of a split (not kept: the caller holds them as long as it needs them)."""
        return load_split(self._data_dir(), name)

    def check_data_fits(self, records: list) -> None:
        """Refuse data prepared with another tokenizer, or records the model cannot take."""
        check_data_fits_model(self._data_dir(), self.meta, records, self.checkpoint_dir, self.config, self.tokenizer)

    def _data_dir(self) -> Path:
        if self.data_dir is None:
            raise ValueError("this run has no --data_dir")  # a caller's mistake, never a user's
        return self.data_dir

    # ------------------------------------------------------------------------------------------------ adapters

    @cached_property
    def adapter(self) -> Optional[Adapter]:
        """--adapter_path resolved: (weights file, run folder, method, method flags), or None without one."""
        return resolve_adapter(self.adapter_path) if self.adapter_path is not None else None

    @property
    def run_dir(self) -> Optional[Path]:
        return self.adapter.run_dir if self.adapter is not None else None

    def adapter_weights(self, adapter: Adapter) -> dict:
        """An adapter's trained tensors, checked to fit this checkpoint's model."""
        weights = load_torch(adapter.file, "adapter weights")
        check_adapter_fits(weights, adapter.file, self.checkpoint_dir, adapter.method, adapter.args, self.config)
        return weights

    # ---------------------------------------------------------------------------------------------- prompting

    def prompt_style(self, name: Optional[str], system: Optional[str], run_dir: Optional[Path] = None):
        """The prompt style of `littune generate`'s rule (`prompts.choose_prompt_style`) for a run folder."""
        return choose_prompt_style(name, run_dir, self.checkpoint_dir, system, tokenizer=self.tokenizer,
                                   tokenizer_config=self.tokenizer_config)


def load_for_inference(fabric, checkpoint_dir: Path, adapter_path: Optional[Path] = None,
                       quantize: Optional[str] = None, inputs: Optional[RunInputs] = None):
    """(model in eval mode, tokenizer, run folder or None) for a base checkpoint plus an optional trained adapter,
    the base quantized with `quantize` where given. `inputs`: the run's, where the command has them (else made of
    checkpoint_dir and adapter_path)."""
    inputs = inputs if inputs is not None else RunInputs(checkpoint_dir, adapter_path=adapter_path)
    adapter = inputs.adapter
    weights = inputs.adapter_weights(adapter) if adapter is not None else None
    method, method_args = (adapter.method, adapter.args) if adapter is not None else (None, None)
    model = load_model(fabric, inputs.checkpoint_dir, method, method_args, adapter=weights, quantize=quantize,
                       config=inputs.config)
    return model.eval(), inputs.tokenizer, inputs.run_dir
