"""Fine-tuning methods: one small file each, saying which parameters train, the method's own flags, the name of its
weights file, and whether its weights fold into the base model. Adding a method = one file + one line in METHODS.

Training (`littune.finetune`) and inference (generate, evaluate, serve, export) both read methods from here.
"""

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable, Optional

# name -> module defining METHOD
METHODS = {
    "adapter_v2": "littune.methods.adapter_v2",
    "lora": "littune.methods.lora",
}


def _nothing(model) -> None:
    pass


@dataclass(frozen=True)
class Method:
    """What differs between fine-tuning methods."""

    name: str
    summary: str  # one line for `littune finetune --help`
    args: type  # a dataclass of the method's own flags (attribute docstrings are their help)
    build_model: Callable[[Any, Any], Any]  # (base litgpt Config, args) -> model with the method's extra parameters
    is_trainable: Callable[[str], bool]  # parameter name -> trains?
    block_class: type  # the transformer block, for FSDP wrapping
    adapter_file: str  # the file name of its trained weights in a run folder
    before_forward: Callable[[Any], None] = _nothing  # called before every forward (caches to drop)
    merge: Optional[Callable[[Any], None]] = None  # folds the trained weights into the base weights, in place
    learning_rate: float = 3e-3  # the peak learning rate when --learning_rate is not given (measured per method)


def get_method(name: str) -> Method:
    from littune.common import UserError

    if name not in METHODS:
        raise UserError(f"unknown fine-tuning method {name!r} (known: {', '.join(METHODS)})")
    return import_module(METHODS[name]).METHOD
