"""A small local stand-in for the Hugging Face Hub, for tests (stdlib `http.server`, one thread in the test process).

It implements just what `huggingface_hub` 1.3.x needs for `HfApi().list_repo_files` and
`snapshot_download(..., local_dir=..., allow_patterns=...)` (point `HF_ENDPOINT` at `server.url`):

    GET  /api/models/{org}/{name}/revision/{rev}     repo info: sha + siblings
    GET  /api/models/{org}/{name}/tree/{rev}[/dir]   file list (list_repo_tree / list_repo_files)
    HEAD /{org}/{name}/resolve/{rev}/{file}          ETag, X-Repo-Commit, Content-Length (file metadata)
    GET  /{org}/{name}/resolve/{rev}/{file}          the bytes; honours `Range: bytes=N-` (206) for resumes

and the Hub's error replies (status + `X-Error-Code`, which `huggingface_hub.hf_raise_for_status` maps to
RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, EntryNotFound):

    unknown repo  404 RepoNotFound
    gated repo    401 GatedRepo without a token, 403 GatedRepo with a wrong one
    private repo  401 (no error code) without a token or with a wrong one

A gated or private repo is served normally to `Authorization: Bearer <its token>`.
Every request is recorded (`server.requests`: method, path, headers) so tests can check what was fetched, with which
Range and Authorization headers. `server.drop_after[(repo_id, filename)] = n` makes the next GET of that file send
its headers and n bytes, then close the connection (an interrupted download).

A hostile mirror: a repo file whose name climbs out (`../../x.safetensors`) is listed as it is and also served at the
path its download URL normalizes to (HTTP clients resolve `..` in a URL: `/org/name/resolve/main/../../x` is
requested as `/org/x`), so a client that trusts such a name really gets the bytes and writes them where it points.
"""

import hashlib
import json
import posixpath
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".model")


@dataclass
class Repo:
    files: dict  # path in repo -> bytes
    access: str = "public"  # public | gated | private
    token: Optional[str] = None  # the token that opens a gated/private repo
    sha: str = ""

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + hashlib.sha1(self.files[name]).digest())
            self.sha = digest.hexdigest()

    def etag(self, name: str) -> str:
        data = self.files[name]
        if name.endswith(LFS_SUFFIXES):  # LFS files: the Hub's ETag is the sha256 of the content
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


@dataclass
class Request:
    method: str
    path: str
    headers: dict = field(default_factory=dict)  # names in Title-Case ("Authorization", "Range")


class HubServer:
    """`with HubServer() as hub: hub.add_folder("org/name", folder); env = {"HF_ENDPOINT": hub.url}`."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.drop_after: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)

    # ------------------------------------------------------------------ setup

    def add_folder(self, repo_id: str, folder: Path, access: str = "public", token: Optional[str] = None,
                   skip: tuple = ()) -> Repo:
        """Serve every file under `folder` (recursively) as repo `repo_id`."""
        folder = Path(folder)
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip
        }
        return self.add_files(repo_id, files, access=access, token=token)

    def add_files(self, repo_id: str, files: dict, access: str = "public", token: Optional[str] = None) -> Repo:
        repo = Repo(files=dict(files), access=access, token=token)
        self.repos[repo_id] = repo
        return repo

    # ------------------------------------------------------------------ inspection

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def requests_for(self, repo_id: str) -> list[Request]:
        """The requests that concerned one repo (API or file), in order."""
        return [r for r in list(self.requests) if repo_of(r.path) == repo_id]

    def gets(self, repo_id: Optional[str] = None) -> list[str]:
        """File names fetched with GET .../resolve/... (of one repo, or all)."""
        out = []
        for r in list(self.requests):
            m = _RESOLVE.match(r.path)
            if r.method == "GET" and m and (repo_id is None or m["repo"] == repo_id):
                out.append(m["file"])
        return out

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<sub>/.*)?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def repo_of(path: str) -> Optional[str]:
    m = _API.match(path) or _RESOLVE.match(path)
    return m["repo"] if m else None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_GET(self):
        self._handle(head=False)

    def do_HEAD(self):
        self._handle(head=True)

    # ------------------------------------------------------------------ dispatch

    def _handle(self, head: bool):
        path = unquote(urlsplit(self.path).path)
        self.hub.record(Request(self.command, path, {k.title(): v for k, v in self.headers.items()}))
        if m := _API.match(path):
            return self._api(m, head)
        if m := _RESOLVE.match(path):
            return self._resolve(m, head)
        if climbing := self._climbing_file(path):
            return self._resolve(climbing, head)
        self._error(404, "EntryNotFound", "not a Hub path")

    def _climbing_file(self, path: str) -> Optional[dict]:
        """The repo file with `..` in its name whose resolve URL normalizes to `path` (see the module docstring)."""
        for repo_id, repo in list(self.hub.repos.items()):
            for name in repo.files:
                if ".." not in name:
                    continue
                for rev in ("main", repo.sha):
                    if posixpath.normpath(f"/{repo_id}/resolve/{rev}/{name}") == path:
                        return {"repo": repo_id, "rev": rev, "file": name}
        return None

    def _repo(self, repo_id: str) -> Optional[Repo]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.access != "public":
            auth = self.headers.get("Authorization")
            if auth == f"Bearer {repo.token}":
                return repo
            if repo.access == "gated":
                self._error(401 if auth is None else 403, "GatedRepo", "Access to model is restricted")
            else:
                message = "Invalid credentials in Authorization header" if auth else "Invalid username or password."
                self._error(401, None, message)
            return None
        return repo

    def _api(self, m, head: bool):
        repo = self._repo(m["repo"])
        if repo is None:
            return
        if m["rev"] is not None and m["rev"] not in ("main", repo.sha):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        if m["kind"] == "tree":
            prefix = (m["sub"] or "").strip("/")
            entries = []
            for name, data in sorted(repo.files.items()):
                if prefix and not name.startswith(prefix + "/"):
                    continue
                entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": repo.etag(name), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return self._json(entries, head)
        info = {
            "id": m["repo"], "modelId": m["repo"], "sha": repo.sha, "private": repo.access == "private",
            "gated": "manual" if repo.access == "gated" else False, "disabled": False, "tags": [],
            "siblings": [{"rfilename": name} for name in sorted(repo.files)],
        }
        self._json(info, head)

    def _resolve(self, m, head: bool):
        repo = self._repo(m["repo"])
        if repo is None:
            return
        if m["rev"] not in ("main", repo.sha):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        name = m["file"]
        if name not in repo.files:
            return self._error(404, "EntryNotFound", "Entry not found", commit=repo.sha)
        data = repo.files[name]
        etag = repo.etag(name)
        start = 0
        if (rng := self.headers.get("Range")) and not head:
            r = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not r or int(r[1]) >= len(data):
                return self._error(416, None, "Range not satisfiable")
            start = int(r[1])
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if not head else len(data)))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        drop = None if head else self.hub.drop_after.pop((m["repo"], name), None)
        if drop is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        if drop is not None:  # an interrupted transfer: part of the body, then the connection goes away
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    # ------------------------------------------------------------------ replies

    def _json(self, obj, head: bool):
        payload = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not head:
            self.wfile.write(payload)

    def _error(self, status: int, code: Optional[str], message: str, commit: Optional[str] = None):
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
