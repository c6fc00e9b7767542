"""Download a model from the Hugging Face Hub (huggingface_hub: HF_ENDPOINT, HF_HOME, HF_TOKEN, offline mode)."""

import glob
import os
import re
import sys
from pathlib import Path
from typing import Literal, Optional

from littune.checkpoints.gguf import convert_gguf
from littune.checkpoints.configs import check_convertible, read_hf_config
from littune.checkpoints.hf import CONFIG_FILES, TOKENIZER_FILES, models
from littune.checkpoints.hf import convert as convert_folder
from littune.checkpoints.origin import record_origin
from littune.checkpoints.weights import NOT_WEIGHTS, check_shard_name, find_weight_files, index_shards, read_index
from littune.common import UserError, first_line


def download(
    repo_id: str,
    checkpoint_dir: Path = Path("checkpoints"),
    access_token: Optional[str] = None,
    revision: Optional[str] = None,
    model_name: Optional[str] = None,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    tokenizer_only: bool = False,
    convert: bool = True,
    gguf_file: Optional[str] = None,
) -> None:
    """Download a model from the Hugging Face Hub into CHECKPOINT_DIR/ORG/NAME and convert it to Lit-GPT format.

    Re-running skips files already there; an interrupted download resumes. `--repo_id list` prints the models.
    With HF_HUB_OFFLINE=1 the Hub is not contacted and the files already in CHECKPOINT_DIR/ORG/NAME are used.

    Arguments:
        repo_id: The Hub repository, e.g. `tiiuae/falcon-7b`; `list` prints the supported models.
        checkpoint_dir: The root folder; files go to CHECKPOINT_DIR/ORG/NAME.
        access_token: Hub token for gated or private repos (default: $HF_TOKEN). Never written to any file.
        revision: A branch, tag or commit of the repo (default: main).
        model_name: The litgpt config name to use, when the repo name is not one (default: from the repo/config.json).
        dtype: Convert the weights to this dtype (default: keep the dtype of the downloaded files).
        tokenizer_only: Download only the config and tokenizer files (enough for `littune prepare`).
        convert: Convert to Lit-GPT format after downloading.
        gguf_file: For a repo of GGUF files (llama.cpp's format): the one to download and convert, e.g.
            `model.Q4_K_M.gguf`. Only that file is fetched: it holds the weights, config and tokenizer
            (with --tokenizer_only the whole file is fetched too, and only the tokenizer files are written).
    """
    if repo_id == "list":
        models()
        return
    if not _REPO_ID.fullmatch(repo_id) or {".", ".."} & set(repo_id.split("/")):  # ORG/NAME is a folder path
        raise UserError(
            f"--repo_id {repo_id!r}: expected ORG/NAME, e.g. tiiuae/falcon-7b (`--repo_id list` lists models)"
        )
    if gguf_file and (gguf_file.startswith("/") or "\\" in gguf_file or ".." in gguf_file.split("/")):
        raise UserError(f"--gguf_file {gguf_file!r}: expected the file's path in the repo, e.g. model.Q4_K_M.gguf "
                        f"(no '..', no leading '/')")
    from huggingface_hub import constants

    local_dir = Path(checkpoint_dir) / repo_id
    convert_after = convert and not tokenizer_only
    if constants.HF_HUB_OFFLINE:
        if gguf_file and not (local_dir / gguf_file).is_file():
            raise UserError(f"HF_HUB_OFFLINE is set and {local_dir / gguf_file} does not exist; unset HF_HUB_OFFLINE "
                            f"to download {repo_id}")
        if not gguf_file:
            _check_offline_folder(repo_id, local_dir, tokenizer_only)
        print(f"HF_HUB_OFFLINE is set: using the files in {local_dir}", file=sys.stderr)
    else:
        token = access_token or os.environ.get("HF_TOKEN") or None
        files = _hub_call(repo_id, lambda: _repo_files(repo_id, revision, token))
        read_index = lambda name: _hub_call(repo_id, lambda: _remote_index(repo_id, revision, token, name))  # noqa: E731
        if gguf_file:
            wanted = _wanted_gguf(repo_id, files, gguf_file)
        else:
            wanted = _wanted_files(repo_id, files, tokenizer_only, read_index)
        # refuse an unconvertible model before its weights (a GGUF file's metadata is inside it: checked after)
        if convert_after and not gguf_file and not _converted(local_dir, dtype):
            hf = _hub_call(repo_id, lambda: _remote_config(repo_id, revision, token))
            check_convertible(hf, local_dir.name, model_name, where=repo_id)
        print(f"Downloading {repo_id}{'@' + revision if revision else ''} to {local_dir}", file=sys.stderr)
        _hub_call(repo_id, lambda: _snapshot(repo_id, revision, token, local_dir, wanted))
        missing = [f for f in wanted if not (local_dir / f).is_file()]
        if missing:  # snapshot_download falls back to a non-empty local_dir when the Hub fails mid-way
            raise UserError(
                f"{repo_id}: download incomplete, missing {', '.join(missing[:5])} in {local_dir}; re-run to resume"
            )
    record_origin(local_dir, {"repo_id": repo_id, "revision": revision})  # for the model cards of its exports
    if gguf_file and convert and tokenizer_only:  # the tokenizer is inside the GGUF file
        convert_gguf(local_dir, local_dir / gguf_file, tokenizer_only=True)
    if not convert_after:
        return
    sources = [local_dir / gguf_file] if gguf_file else None
    if _converted(local_dir, dtype, sources):
        print(
            f"{local_dir / 'lit_model.pth'} is up to date; skipping conversion "
            f"(littune convert --checkpoint_dir {local_dir} redoes it)",
            file=sys.stderr,
        )
        return
    convert_folder(local_dir, model_name=model_name, dtype=dtype, gguf_file=gguf_file)


# ------------------------------------------------------------------------------------------------------ the Hub


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _repo_files(repo_id: str, revision: Optional[str], token: Optional[str]) -> list[str]:
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo_id, revision=revision, token=token)


def _remote_config(repo_id: str, revision: Optional[str], token: Optional[str]) -> Optional[dict]:
    """The repo's config.json (None if it has none), fetched alone into the HF cache, not into the checkpoint folder.

    `snapshot_download` later copies it from that cache instead of fetching it again.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, token=token)
    except EntryNotFoundError:
        return None
    return read_hf_config(Path(path), f"{repo_id}: config.json on the Hub")


def _snapshot(repo_id: str, revision: Optional[str], token: Optional[str], local_dir: Path, files: list[str]):
    from huggingface_hub import snapshot_download

    patterns = [glob.escape(f) for f in files]  # exact names, not patterns
    return snapshot_download(repo_id, revision=revision, token=token, local_dir=local_dir, allow_patterns=patterns)


def _wanted_files(repo_id: str, files: list[str], tokenizer_only: bool, read_index=None) -> list[str]:
    """Config and tokenizer files, plus one weight format: safetensors when the repo has them, else .bin.

    With a shard index, exactly the shards it names (repos such as Mistral's also hold a `consolidated.safetensors`
    copy of the same weights); `read_index(name)` fetches an index and returns its shard names. Never
    training_args.bin, optimizer states or other formats (flax, tf, onnx, gguf): only what conversion reads.
    """
    top_level = {f for f in files if "/" not in f}
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if ggufs and not any(f.endswith((".safetensors", ".bin")) for f in top_level):
        raise UserError(
            f"{repo_id}: the repo holds GGUF files, not Hugging Face weights; pick one with --gguf_file: "
            f"{', '.join(ggufs[:8])}{' ...' if len(ggufs) > 8 else ''}"
        )
    wanted = [f for f in CONFIG_FILES + TOKENIZER_FILES if f in top_level]
    if not any(f in top_level for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{repo_id}: the repo has no tokenizer.json or tokenizer.model; littune needs one of them")
    if tokenizer_only:
        return wanted
    for suffix, index in ((".safetensors", "model.safetensors.index.json"), (".bin", "pytorch_model.bin.index.json")):
        if index in top_level and read_index is not None:
            shards = sorted(set(read_index(index)))
            missing = [f for f in shards if f not in files]
            if missing:
                raise UserError(f"{repo_id}: {index} names shards the repo does not have: {', '.join(missing[:3])}")
            return wanted + [index] + shards
        weights = sorted(f for f in top_level if f.endswith(suffix) and f not in NOT_WEIGHTS)
        for name in weights:  # each is written to local_dir / name
            check_shard_name(name, suffix, f"{repo_id}: the repo's file list")
        if weights:
            return wanted + weights + [index] * (index in top_level)
    raise UserError(f"{repo_id}: the repo has no weight files (*.safetensors or *.bin); nothing to convert")


def _wanted_gguf(repo_id: str, files: list[str], gguf_file: str) -> list[str]:
    """Just the GGUF file: its metadata holds the config and the tokenizer."""
    if gguf_file not in files:
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        have = f"its GGUF files: {', '.join(ggufs[:8])}{' ...' if len(ggufs) > 8 else ''}" if ggufs else "none are GGUF"
        raise UserError(f"{repo_id}: no file {gguf_file!r} in the repo ({have})")
    return [gguf_file]


def _remote_index(repo_id: str, revision: Optional[str], token: Optional[str], name: str) -> list[str]:
    """The shard names of a weight index on the Hub (fetched into the HF cache, like config.json), each a plain
    weight-file name (`check_shard_name`): the files are written to local_dir / name."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id, name, revision=revision, token=token)
    where = f"{repo_id}: {name} on the Hub"
    return index_shards(read_index(Path(path), where), name, where)


def _check_offline_folder(repo_id: str, local_dir: Path, tokenizer_only: bool) -> None:
    """With HF_HUB_OFFLINE set, the folder must already hold what the command needs."""
    hint = f"unset HF_HUB_OFFLINE to download {repo_id}"
    if not local_dir.is_dir():
        raise UserError(f"HF_HUB_OFFLINE is set and {local_dir} does not exist; {hint}")
    if not any((local_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"HF_HUB_OFFLINE is set and {local_dir} has no tokenizer; {hint}")
    if not tokenizer_only:
        try:
            find_weight_files(local_dir)
        except UserError as e:
            raise UserError(f"HF_HUB_OFFLINE is set and {e}; {hint}") from e


def _converted(local_dir: Path, dtype: Optional[str], sources: Optional[list[Path]] = None) -> bool:
    """lit_model.pth and model_config.yaml exist, are newer than the HF weights and config (or `sources`: the GGUF
    file), and of the asked dtype."""
    pth, cfg = local_dir / "lit_model.pth", local_dir / "model_config.yaml"
    if not (pth.is_file() and cfg.is_file()):
        return False
    if sources is not None and len([p for p in local_dir.rglob("*.gguf") if ".cache" not in p.parts]) > 1:
        return False  # lit_model.pth may come from another of the folder's GGUF files
    if sources is None:
        try:
            sources = find_weight_files(local_dir)
        except UserError:
            return False
        sources += [f for f in (local_dir / "config.json",) if f.is_file()]
    if not all(f.is_file() for f in sources):
        return False
    if pth.stat().st_mtime < max(f.stat().st_mtime for f in sources):
        return False
    if dtype:
        import torch

        try:
            state = torch.load(pth, map_location="cpu", weights_only=True, mmap=True)
            first = next(v for v in state.values() if isinstance(v, torch.Tensor))
        except Exception:  # unreadable: convert again
            return False
        return first.dtype == getattr(torch, dtype)
    return True


def _hub_call(repo_id: str, call):
    """Run a Hub call, turning the Hub's errors into one line that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    unreachable = (
        f"{repo_id}: cannot reach the Hub at {endpoint} (check HF_ENDPOINT and your network; with HF_HUB_OFFLINE=1 "
        f"littune uses the files already downloaded)"
    )
    try:
        return call()
    except GatedRepoError as e:
        raise UserError(
            f"{repo_id}: gated repo; accept its terms on the Hub, then pass --access_token (or set HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise UserError(
            f"{repo_id}: repository not found on {endpoint} (if it is private, pass --access_token or set HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise UserError(f"{repo_id}: no such revision on {endpoint}; check --revision (a branch, tag or commit)") from e
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise UserError(unreachable) from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise UserError(
                f"{repo_id}: access denied ({status}); pass --access_token or set HF_TOKEN with access to this repo"
            ) from e
        raise UserError(f"{repo_id}: the Hub at {endpoint} answered {status}: {first_line(e)}") from e
    except Exception as e:
        kind = _network_error_kind(e)
        if kind == "connect":
            raise UserError(f"{unreachable[:-1]}; {type(e).__name__})") from e
        if kind == "transfer":  # the connection broke mid-transfer (read error or timeout, peer closed)
            raise UserError(
                f"{repo_id}: download interrupted ({type(e).__name__}); re-run the same command to resume"
            ) from e
        if isinstance(e, OSError) and "Consistency check failed" in str(e):  # fewer bytes arrived than announced
            raise UserError(f"{repo_id}: download interrupted (file incomplete); re-run the same command to resume")
        if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions, ...
            raise UserError(f"{repo_id}: cannot write {e.filename or 'the download'}: {e.strerror}") from e
        raise


def _network_error_kind(e: Exception) -> Optional[str]:
    """"connect" (no connection could be made), "transfer" (it broke mid-way) or None, for httpx/requests errors."""
    names = {cls.__name__ for cls in type(e).__mro__ if cls.__module__.startswith(_HTTP_MODULES)}
    if not names:
        return None
    if names & {"ConnectError", "ConnectTimeout", "UnsupportedProtocol", "ProxyError", "InvalidURL", "MissingSchema"}:
        return "connect"
    if type(e).__module__.startswith("requests") and type(e).__name__ == "ConnectionError":
        return "connect"
    return "transfer"


_HTTP_MODULES = ("httpx", "httpcore", "requests", "urllib3")


