"""Small helpers every step shares: the user-facing error type, flag checks declared with the flag, atomic writes.

Nothing here knows about models or data; it sits left of every other module.
"""

import functools
import hashlib
import inspect
import json
import math
import os
import tempfile
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


class UserError(Exception):
    """Bad input the user can fix. The CLI prints its message as one line and exits non-zero, no traceback."""


@dataclass(frozen=True)
class Check:
    """The valid values of a numeric flag, declared with the flag: `batch_size: Annotated[int, Check(ge=1)] = 16`.

    Bounds: ge (>=), gt (>), le (<=), lt (<). Non-finite numbers (nan, inf) are never valid. `checked` applies every
    Check of a command's signature before the command runs, so a bad value fails before any file is touched.
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def __repr__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        bounds = [(">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)]
        return " and ".join(f"{op} {_number(v)}" for op, v in bounds if v is not None) or "finite"

    def allows(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def declared_checks(function: Callable) -> dict[str, Check]:
    """flag name -> its Check, for every parameter annotated `Annotated[..., Check(...)]` (also inside Optional)."""
    hints = typing.get_type_hints(function, include_extras=True)
    return {name: check for name, hint in hints.items() if (check := _find_check(hint)) is not None}


def _find_check(hint) -> Optional[Check]:
    if typing.get_origin(hint) is typing.Annotated:
        return next((m for m in hint.__metadata__ if isinstance(m, Check)), None)
    return next((c for arg in typing.get_args(hint) if (c := _find_check(arg)) is not None), None)


def check_flags(checks: dict[str, Check], values: dict) -> None:
    """A UserError naming the first flag whose value its Check refuses. None ("not given") and words (the other
    choices of a flag such as `--eval_iters all`, already checked by the parser) pass."""
    for name, check in checks.items():
        value = values.get(name)
        if value is not None and not isinstance(value, str) and not check.allows(value):
            raise UserError(f"--{name} {value}: must be {check.describe()}")


def checked(function: Callable) -> Callable:
    """The command with its declared flag checks run first (the CLI and Python callers both get them)."""
    checks = declared_checks(function)
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        check_flags(checks, bound.arguments)
        return function(*args, **kwargs)

    run.checks = checks
    return run


def check_fields(cls: type, values: dict, where: str, prefix: str = "") -> dict:
    """The entries of `values` (a file's record of a run's flags) that are fields of the dataclass `cls`, each
    checked against its declared type and Check first: a crafted or damaged file gets one line naming the file and
    the field (`prefix` + its name), not a traceback from deep inside the model (or a model built with a rank of
    "8")."""
    hints = typing.get_type_hints(cls, include_extras=True)
    checks = declared_checks(cls)
    for name in [n for n in cls.__dataclass_fields__ if n in values]:
        value, check = values[name], checks.get(name)
        if not _fits(hints[name], value) or (check is not None and value is not None and not check.allows(value)):
            must = describe_type(hints[name]) + (f" {check.describe()}" if check is not None else "")
            raise UserError(f"{where}: {prefix}{name} is {json_type(value)} ({_short(value)}); it must be {must} "
                            f"(correct it, or restore the file the run wrote)")
    return {name: values[name] for name in cls.__dataclass_fields__ if name in values}


def _fits(hint, value) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _fits(args[0], value)
    if origin is typing.Union:
        return any(_fits(arg, value) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(args[0], v) for v in value) if args else isinstance(value, list)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    return True  # a type no run file holds: left to its reader


def describe_type(hint) -> str:
    """A declared type in words, for messages: `Optional[Annotated[int, ...]]` -> "a whole number or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return describe_type(args[0])
    if origin is typing.Union:
        return " or ".join(describe_type(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if origin is list:
        inner = describe_type(args[0]) if args else ""
        return "a list" + (f" of {inner.removeprefix('one of ')}" if inner.startswith("one of") else
                           f" of {inner.removeprefix('a ')}s" if inner else "")
    names = {type(None): "null", bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             Path: "a path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash (or a kill) mid-write leaves the old file or no file, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the mode a plain open() would give
    try:
        yield tmp
        with open(tmp, "rb") as f:  # make the bytes durable before the rename makes them visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block succeeds its files are made durable and it replaces
    `path` whole (an old `path` is set aside, then removed). A failure or a kill leaves the old folder or, for a
    kill between the two renames, the old folder under its set-aside name, which `remove_atomic_leftovers` puts
    back: never a mix of old and new files.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder gets the mode a plain mkdir would give
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def remove_atomic_leftovers(folder: Path) -> None:
    """What `atomic_path` and `atomic_folder` leave in `folder` when the process is killed mid-write: temporaries
    (".NAME.XXXXXXXX.tmp", never mistaken for an output) are removed; an old folder set aside (".tmp.old") whose
    replacement never arrived is put back under its name."""
    import shutil

    for leftover in sorted(Path(folder).glob(".*.tmp*")):
        name = leftover.name[1:].rsplit(".", 3)[0]  # ".best.k2j3h4g5.tmp.old" -> "best"
        if leftover.name.endswith(".tmp.old") and leftover.is_dir() and not (leftover.parent / name).exists():
            os.replace(leftover, leftover.parent / name)
        elif leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_outputs(folder: Path, outputs: list[Path], overwrite: bool, what: str, instead: str = "",
                    remove: bool = True) -> None:
    """An output folder that holds an earlier command's outputs is refused, unless --overwrite: then those outputs
    (and only those: the folder may hold other files of the user's) are removed first, where `remove` (a command
    that replaces each of its files atomically anyway passes False, so a failed run leaves the old ones)."""
    import shutil

    if not outputs:
        return
    if not overwrite:
        names = ", ".join(sorted(p.name for p in outputs)[:4])
        raise UserError(f"{folder}: holds {what} ({names}); pass --overwrite to replace it{instead}, or choose "
                        f"another folder")
    for path in outputs if remove else []:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def write_torch(obj: Any, path: Path) -> None:
    """torch.save through a file object: given a path, torch.save names the archive's inner folder after the file
    name, so saving to a random temporary name would make two saves of the same object differ in bytes."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


def save_torch(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        write_torch(obj, tmp)


def save_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def load_torch(path: Path, what: str = "file") -> Any:
    """torch.load with weights_only=True (a .pt from elsewhere must not run code), errors as UserError."""
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or another format
        state = "empty" if path.stat().st_size == 0 else "truncated or not a PyTorch file"
        raise UserError(f"{path}: cannot read {what}: the file is {state}; write it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # damaged inside, or holds objects weights_only refuses
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {first_line(e)})") from e


def first_line(error: Exception) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages about a file's or a request's content."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
