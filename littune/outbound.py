"""What leaves this machine: the one filter for values that experiment loggers (W&B, MLflow, TensorBoard), model
cards, exports and messages carry elsewhere. Credentials in URLs (`https://user:password@host`, `?token=...`) are
masked and absolute local paths are cut to their last part (`/home/alice/data/sst2` -> `sst2`: which data, not
where it lies). hyperparameters.yaml, which stays in the run folder and a resume reads, keeps the real values.
"""

import re
from pathlib import Path

# scheme://user:password@ or scheme://token@ : everything between // and @ before the host
USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
SECRET_PARAMETER = re.compile(r"(?i)([?&;](?:access_token|api[_-]?key|key|password|passwd|pwd|secret|sig|signature|"
                              r"token|auth)=)[^&#;\s]*")
MASK = "***"


def redacted(text: str) -> str:
    """text with the credentials of any URL in it masked."""
    return SECRET_PARAMETER.sub(rf"\1{MASK}", USERINFO.sub(rf"\1{MASK}@", text))


def is_local_path(text: str) -> bool:
    """An absolute path of this machine (POSIX or Windows), or a file: URI, or one under the home folder (~)."""
    return (text.startswith(("/", "~", "file:")) or bool(re.match(r"^[A-Za-z]:[\\/]", text))) and "\n" not in text


def outbound_value(value):
    """A flag's value as it may leave the machine (dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: outbound_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [outbound_value(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        if is_local_path(value):
            name = re.split(r"[\\/]", value.rstrip("/\\"))[-1] or MASK
            return redacted(name)
        return redacted(value)
    return value


def outbound(values: dict) -> dict:
    """A run's flags (hyperparameters.yaml) as experiment loggers may get them."""
    return outbound_value(values)
