"""The `littune` entry point: one subcommand per workflow function, built by jsonargparse from its signature.

Every subcommand takes `--config file.yaml` and `--print_config`. Errors the user can fix (`UserError`) are printed
as one line on stderr with exit code 1 and no traceback; a command line jsonargparse cannot parse gets one line too
(the missing flag and what it is, or the closest valid flags to a mistyped one), exit code 2, and no usage block
(`--help` prints that). Dashed spellings (`--data-dir`) are accepted for the underscored flags. A flag that takes
several strings (a `list[str]`, e.g. serve's --adapter) is given once per value: `--adapter a=x --adapter b=y`.
"""

import difflib
import inspect
import os
import re
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
    "finetune": {"_help": "Fine-tune a converted checkpoint on prepared data (one method per subcommand).",
                 **{name: f"littune.finetune:{name}" for name in METHODS}},
    "sweep": {"_help": "Search finetune's flags with Optuna (pip install 'littune[sweep]').",
              **{name: f"littune.sweep:{name}" for name in METHODS}},
    "generate": "littune.generate:generate",
    "serve": "littune.serve:serve",
    "evaluate": "littune.evaluate:evaluate",
    "merge": "littune.export:merge",
    "export": "littune.export:export",
    "demo": "littune.demo:demo",
}


def _resolve(spec):
    if isinstance(spec, dict):
        return {name: sub if name == "_help" else _resolve(sub) for name, sub in spec.items()}
    module, function = spec.split(":")
    return getattr(import_module(module), function)


def _selected(argv: list[str]) -> dict:
    """Only import the chosen subcommand's module (torch and litgpt imports are slow); all of them for --help."""
    if argv and argv[0] in COMMANDS:
        return {argv[0]: COMMANDS[argv[0]]}
    return COMMANDS


def main(argv: Optional[list[str]] = None) -> int:
    from jsonargparse import CLI, ArgumentError, set_parsing_settings

    import littune
    from littune.common import UserError

    argv = [_underscored(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=r".*The epoch parameter in `scheduler.step\(\)`.*")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    components = _resolve(_selected(argv))
    argv = _appended(argv, components)
    try:
        CLI(components, args=argv, as_positional=False, description=__doc__.splitlines()[0], prog="littune",
            exit_on_error=False, version=littune.__version__)
    except ArgumentError as e:
        print(f"littune: error: {explain_parse_error(str(e), argv, components)}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"littune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("littune: interrupted", file=sys.stderr)
        return 130
    return 0


def _underscored(arg: str) -> str:
    """`--data-dir` -> `--data_dir` (and `--data-dir=x`): littune's flags are underscored, people type dashes."""
    match = re.fullmatch(r"(--[A-Za-z][\w-]*)(=.*)?", arg, flags=re.DOTALL)
    return match.group(1).replace("-", "_").replace("__", "--", 1) + (match.group(2) or "") if match else arg


def _appended(argv: list[str], components: dict) -> list[str]:
    """`--flag VALUE` (or `--flag=VALUE`) -> `--flag+=VALUE` for the command's list-of-strings flags: jsonargparse
    reads a repeated flag's last value only (and a plain string is no list), `+=` appends. A YAML list (`[a, b]`)
    is left as it is."""
    _, function = _command_of(argv, components)
    if isinstance(function, dict):
        return argv
    flags = {f"--{name}" for name in _string_list_flags(function)}
    out, i = [], 0
    while i < len(argv):
        flag, equals, value = argv[i].partition("=")
        if flag in flags and not equals and i + 1 < len(argv) and not argv[i + 1].startswith(("[", "--")):
            out.append(f"{flag}+={argv[i + 1]}")
            i += 2
            continue
        out.append(f"{flag}+={value}" if flag in flags and equals and not value.startswith("[") else argv[i])
        i += 1
    return out


def _string_list_flags(function) -> list[str]:
    import typing

    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that cannot be resolved: nothing to rewrite
        return []
    return [name for name, hint in hints.items() if name != "return" and list[str] in (hint, *typing.get_args(hint))]


def _command_of(argv: list[str], components: dict) -> tuple[list[str], object]:
    """(the subcommand path the user typed, its function or group dict)."""
    path, node = [], components
    for arg in argv:
        if isinstance(node, dict) and arg in node and arg != "_help":
            path.append(arg)
            node = node[arg]
        else:
            break
    return path, node


def _flags_of(function) -> dict[str, str]:
    """flag name -> its help text, from the function's signature and docstring."""
    from docstring_parser import parse

    docs = {p.arg_name: " ".join((p.description or "").split()) for p in parse(function.__doc__ or "").params}
    return {name: docs.get(name, "") for name in inspect.signature(function).parameters}


def explain_parse_error(message: str, argv: list[str], components: dict) -> str:
    """jsonargparse's error as one line that says what to do."""
    path, node = _command_of(argv, components)
    command = " ".join(path)
    where = f"{command}: " if command else ""
    if isinstance(node, dict):  # a group or the top level: the subcommand is missing or unknown
        choices = ", ".join(k for k in node if k != "_help")
        typed = next((a for a in argv[len(path):] if not a.startswith("-")), None) if len(argv) > len(path) else None
        got = f"; got {argv[len(path)]!r}" if len(argv) > len(path) else ""
        hint = f" (did you mean {difflib.get_close_matches(typed, list(node), 1)[0]}?)" \
            if typed and difflib.get_close_matches(typed, list(node), 1) else ""
        return f"{where}name a subcommand first: one of {choices}{got}{hint}"
    flags = _flags_of(node)
    required = re.search(r'Key "([\w.]+)" is required', message)
    if required:
        flag = required.group(1).split(".")[-1]
        return f"{where}--{flag} is required: {flags.get(flag) or 'see --help'}"
    unknown = re.search(r"Unrecognized arguments: (\S+)", message)
    if unknown:
        typed = unknown.group(1).split("=")[0]
        close = difflib.get_close_matches(typed.lstrip("-"), list(flags), n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else f"see littune {command} --help"
        return f"{where}unknown flag {typed}; {hint}"
    if "parsing config" in message and "--config" in argv[:-1]:  # a --config file that is not YAML
        config = argv[argv.index("--config") + 1]
        return f"{where}--config {config}: {' '.join(message.split(': ', 1)[-1].split())[:250]}"
    key = re.match(r'Parser key "([\w.]+)":\s*(.*)', message, flags=re.DOTALL)
    if key:
        flag = key.group(1).split(".")[-1]
        choices = _literal_choices(node, flag)
        if choices:  # jsonargparse's own message for a Literal can be "Cannot take a Union of no types"
            return f"{where}--{flag} {_typed_value(argv, flag)!r} is not a choice; choose one of {', '.join(choices)}"
        return f"{where}--{flag}: {' '.join(key.group(2).split())[:300]}"
    return f"{where}{' '.join(message.split())[:300]}"


def _literal_choices(function, flag: str) -> list[str]:
    """The allowed values of a flag annotated with a Literal (or Optional[Literal]), else []."""
    import typing

    try:
        hint = typing.get_type_hints(function, include_extras=False).get(flag)
    except Exception:  # an annotation that cannot be resolved: no choices to offer
        return []
    for candidate in (hint, *typing.get_args(hint)):
        if typing.get_origin(candidate) is typing.Literal:
            return [str(value) for value in typing.get_args(candidate)]
    return []


def _typed_value(argv: list[str], flag: str) -> str:
    """What the user gave for --flag (the last time it appears), as typed."""
    value = ""
    for i, arg in enumerate(argv):
        if arg == f"--{flag}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{flag}="):
            value = arg.split("=", 1)[1]
    return value


if __name__ == "__main__":
    sys.exit(main())
