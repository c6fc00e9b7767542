"""Fine-tuning: one Fabric training loop (`loop.py`) shared by every method (`adapter_v2.py`, ...)."""

from importlib import import_module


def get_method(name: str):
    """The `Method` of `littune/finetune/<name>.py` (each method module defines METHOD)."""
    from littune.common import UserError

    try:
        return import_module(f"littune.finetune.{name}").METHOD
    except ModuleNotFoundError as e:
        raise UserError(f"unknown fine-tuning method {name!r} (known: adapter_v2)") from e
