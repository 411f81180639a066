"""A stand-in for the Hugging Face Hub on 127.0.0.1, in a thread: the endpoints huggingface_hub's
``snapshot_download`` calls (repository info at a revision, the file tree, and HEAD/GET of ``resolve``
URLs with ranges), gated repositories, and a download cut halfway once, as a flaky link does."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Seen:
    """One request the Hub received."""

    method: str
    path: str
    range: str | None
    authorization: str | None


def commit_of(files: dict[str, bytes]) -> str:
    """A 40-hex commit id derived from the files, as a git commit is."""
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
    return digest.hexdigest()


@dataclass
class FakeRepo:
    """Commits (id -> path -> bytes) and refs (branch or tag -> commit id); ``tokens``: a gated repository
    and the tokens granted access to it."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    tokens: frozenset[str] | None = None

    def add(self, ref: str, files: dict[str, bytes]) -> str:
        commit = commit_of(files)
        self.commits[commit] = files
        self.refs[ref] = commit
        return commit

    def commit(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".model"))


class FakeHub:
    """``with FakeHub(repos) as hub``: serves ``repos`` (org/name -> FakeRepo) at ``hub.url`` until the block
    ends. ``seen`` lists the requests; a path in ``cut_once`` has its next full GET cut halfway."""

    def __init__(self, repos: dict[str, FakeRepo]) -> None:
        self.repos = repos
        self.seen: list[Seen] = []
        self.cut_once: set[str] = set()
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def files(self, method: str = "GET") -> list[Seen]:
        """The requests for files (not the API's) made with ``method``."""
        with self.lock:
            return [s for s in self.seen if s.method == method and "/resolve/" in s.path]

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.seen.append(seen)

    def take_cut(self, path: str) -> bool:
        with self.lock:
            if path in self.cut_once:
                self.cut_once.discard(path)
                return True
            return False


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, body: bool) -> None:
            raw = urlsplit(self.path).path
            hub.record(Seen(self.command, unquote(raw), self.headers.get("Range"), self.headers.get("Authorization")))
            parts = [unquote(p) for p in raw.strip("/").split("/")]
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                self._api(f"{parts[2]}/{parts[3]}", parts[4], parts[5])
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
            else:
                self._error(404, "EntryNotFound")

        def _error(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _json(self, value: object) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _repo_commit(self, name: str, revision: str) -> tuple[FakeRepo, str] | None:
            repo = hub.repos.get(name)
            if repo is None:
                self._error(404, "RepoNotFound")
                return None
            commit = repo.commit(revision)
            if commit is None:
                self._error(404, "RevisionNotFound")
                return None
            return repo, commit

        def _api(self, name: str, kind: str, revision: str) -> None:
            found = self._repo_commit(name, revision)
            if found is None:
                return
            repo, commit = found
            files = repo.commits[commit]
            if kind == "revision":
                siblings = [{"rfilename": p} for p in files]
                self._json(
                    {"id": name, "sha": commit, "private": False, "gated": bool(repo.tokens), "siblings": siblings}
                )
                return
            self._json([_tree_entry(path, data) for path, data in files.items()])

        def _file(self, name: str, revision: str, path: str, body: bool) -> None:
            found = self._repo_commit(name, revision)
            if found is None:
                return
            repo, commit = found
            if repo.tokens is not None:
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if token not in repo.tokens:
                    self._error(403 if token else 401, "GatedRepo")
                    return
            data = repo.commits[commit].get(path)
            if data is None:
                self._error(404, "EntryNotFound")
                return
            self._send_file(commit, path, data, body)

        def _send_file(self, commit: str, path: str, data: bytes, body: bool) -> None:
            etag = hashlib.sha256(data).hexdigest() if _is_lfs(path) else _git_oid(data)
            start = _range_start(self.headers.get("Range"))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if not start and hub.take_cut(path):
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


def _range_start(header: str | None) -> int:
    """The first byte of ``bytes=N-`` (the only form huggingface_hub sends), 0 without one."""
    if not header or not header.startswith("bytes="):
        return 0
    return int(header.removeprefix("bytes=").split("-", 1)[0] or 0)


def _tree_entry(path: str, data: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": _git_oid(data)}
    if _is_lfs(path):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry
