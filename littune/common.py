"""Small helpers every step shares: the user-facing error type and atomic writes.

Nothing here knows about models or data; it sits left of every other module.
"""

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class UserError(Exception):
    """Bad input the user can fix. The CLI prints its message as one line and exits non-zero, no traceback."""


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a torch file, or holds objects weights_only refuses
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def first_line(error: Exception) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
