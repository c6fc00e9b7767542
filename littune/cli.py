"""The `littune` entry point: one subcommand per workflow function, built by jsonargparse from its signature.

Every subcommand takes `--config file.yaml` and `--print_config`. Errors the user can fix (`UserError`) are printed
as one line on stderr with exit code 1 and no traceback.
"""

import os
import sys
import warnings
from importlib import import_module
from typing import Optional

from littune.methods import METHODS

# name -> "module:function"; a nested dict is a subcommand group (`littune finetune adapter_v2`).
COMMANDS = {
    "download": "littune.checkpoints.hub:download",
    "convert": "littune.checkpoints.hf:convert",
    "models": "littune.checkpoints.hf:models",
    "prepare": "littune.data:prepare",
    "finetune": {name: f"littune.finetune:{name}" for name in METHODS},
    "generate": "littune.generate:generate",
    "evaluate": "littune.evaluate:evaluate",
    "merge": "littune.export:merge",
    "export": "littune.export:export",
    "demo": "littune.demo:demo",
}


def _resolve(spec):
    if isinstance(spec, dict):
        return {name: _resolve(sub) for name, sub in spec.items()}
    module, function = spec.split(":")
    return getattr(import_module(module), function)


def _selected(argv: list[str]) -> dict:
    """Only import the chosen subcommand's module (torch and litgpt imports are slow); all of them for --help."""
    if argv and argv[0] in COMMANDS:
        return {argv[0]: COMMANDS[argv[0]]}
    return COMMANDS


def main(argv: Optional[list[str]] = None) -> int:
    from jsonargparse import CLI, set_parsing_settings

    from littune.common import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=r".*The epoch parameter in `scheduler.step\(\)`.*")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    components = _resolve(_selected(argv))
    try:
        CLI(components, args=argv, as_positional=False, description=__doc__.splitlines()[0], prog="littune")
    except UserError as e:
        print(f"littune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("littune: interrupted", file=sys.stderr)
        return 130
    return 0




if __name__ == "__main__":
    sys.exit(main())
