"""Where a converted folder came from: `origin.json`, written by `download` (the Hub repo id and revision) and by
`convert` of a GGUF file (its `general.*` metadata: name, organization, licence, and the repository it was made from
where the file says), read by the model card (`base_model`, `license`) of every export.

The file holds only what the source published: never a token, never a local path. A hand-edited or damaged one is
read as empty (the card then falls back on the folder's layout and its README), never as an error.
"""

import json
import re
from pathlib import Path
from typing import Optional

from littune.common import save_json

ORIGIN_FILE = "origin.json"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # ORG/NAME on the Hub
# a GGUF file's metadata -> origin.json's names; `general.source.*` is the model the file was converted from
# (`general.base_model.N.*` would be the model *that* one was fine-tuned from: not this model's id)
GGUF_FIELDS = {"general.name": "name", "general.organization": "organization", "general.license": "license",
               "general.basename": "basename", "general.size_label": "size_label", "general.finetune": "finetune"}
GGUF_SOURCES = ("general.source.huggingface.repository", "general.source.repo_url")
HUB_URL = re.compile(r"(?:https?://)?(?:www\.)?huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:\.git)?/?$")
MAX_TEXT = 200  # a field longer than this is not a name (and would bloat every card)


def hub_repo_id(value) -> Optional[str]:
    """ORG/NAME from a repo id or a huggingface.co URL; None for anything else (another host, a path)."""
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        return None
    match = HUB_URL.match(value.strip())
    candidate = match.group(1) if match else value.strip()
    return candidate if REPO_ID.fullmatch(candidate) and ".." not in candidate else None


def gguf_origin(meta: dict) -> dict:
    """The origin a GGUF file's metadata states: its name, organization, licence, ... and `repo_id` where
    `general.source.*` names a Hub repository."""
    origin = {name: meta[key] for key, name in GGUF_FIELDS.items()
              if isinstance(meta.get(key), str) and 0 < len(meta[key]) <= MAX_TEXT}
    repo_id = next((r for r in (hub_repo_id(meta.get(key)) for key in GGUF_SOURCES) if r), None)
    return {**origin, **({"repo_id": repo_id} if repo_id else {})}


def read_origin(checkpoint_dir: Path) -> dict:
    """origin.json's string fields ({} where there is none or it is not a JSON object of strings)."""
    path = Path(checkpoint_dir) / ORIGIN_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str) and len(v) <= MAX_TEXT}


def record_origin(checkpoint_dir: Path, fields: dict, keep_repo_id: bool = False) -> None:
    """Add `fields` (its empty ones left out) to the folder's origin.json. keep_repo_id: a repo id already there
    (recorded by `download`) wins over the one given (a GGUF file's metadata)."""
    known = read_origin(checkpoint_dir)
    given = {k: v for k, v in fields.items() if isinstance(v, str) and v}
    if keep_repo_id and "repo_id" in known:
        given.pop("repo_id", None)
    merged = {**known, **given}
    if merged and merged != known:
        save_json(merged, Path(checkpoint_dir) / ORIGIN_FILE)
