"""Fine-tuning methods: one small file each, saying which parameters train, the method's own flags, the name of its
weights file, and whether its weights fold into the base model. Adding a method = one file + one line in METHODS.

Training (`littune.finetune`) and inference (generate, evaluate, serve, export) both read methods from here: what
a method is (shares a prefix or not, its weights' names, how the model card names it) is a field of its `Method`,
never a check of its name elsewhere.
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


def _always_shares(method_args) -> None:
    return None


def wrapped_linear_name(name: str) -> str:
    """The base model's name of a weight in litgpt's method models, which wrap each base Linear as `.linear`
    (attn.qkv.linear.weight -> attn.qkv.weight)."""
    return name.replace(".linear.", ".")


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
    # method flags -> why a micro-batch's records cannot share one prefix forward with them (None: they can)
    unshared_reason: Callable[[Any], Optional[str]] = _always_shares
    base_name: Callable[[str], str] = wrapped_linear_name  # a merged weight's name -> its name in the base model
    card_label: str = ""  # what the model card calls it ("a LoRA adapter")
    card_tags: tuple = ()  # the model card's tags besides littune and the method's name


def get_method(name: str) -> Method:
    from littune.common import UserError

    if name not in METHODS:
        raise UserError(f"unknown fine-tuning method {name!r} (known: {', '.join(METHODS)})")
    return import_module(METHODS[name]).METHOD
