"""A local stand-in for the Hugging Face Hub's HTTP API, for tests that run the real `huggingface_hub`/`datasets` clients.

Only the endpoints those clients were seen to call are served (found by running them against it): repository info,
tree and paths-info listings, `resolve/` downloads (HEAD and GET with ranges, with the headers `huggingface_hub` reads:
`ETag`, `X-Repo-Commit`, `Content-Length`, `X-Linked-Etag`/`X-Linked-Size`), repository and branch creation,
preupload, NDJSON commits and whoami. Every file is uploaded in "regular" mode (base64 in the commit), so neither LFS
nor Xet is involved. Repositories live on disk: content-addressed blobs plus one JSON file per repository holding its
commits and refs, so branches and revisions behave as on the Hub (a commit to a branch leaves `main` unchanged).

Errors carry the `X-Error-Code` header the client maps to its exceptions (`RepoNotFound`, `RevisionNotFound`,
`EntryNotFound`); like the Hub, a private repository looks missing (401) to a request without a valid token. Faults are
injected per request pattern ([`Fault`]): an HTTP status (with headers such as `Retry-After`) a number of times, or a
connection dropped after reading part of the request body. Every request is recorded in [`HubServer.requests`].

The server runs in a daemon thread of the test process, so it ends with it however it ends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


USER = "ilr-tester"


@dataclass
class Fault:
    """
    An error the server answers instead of handling a request.

    Args:
        method (`str`):
            HTTP method it applies to (`POST`, `GET`, `HEAD`).
        path (`str`):
            Regular expression searched in the request path (e.g. `/commit/`).
        status (`int`, *optional*, defaults to `503`):
            Status to answer; ignored when `drop` is set.
        times (`int`, *optional*, defaults to `1`):
            How many matching requests fail; later ones are handled normally.
        headers (`dict[str, str]`, *optional*):
            Extra response headers (e.g. `{"Retry-After": "1"}`).
        drop (`bool`, *optional*, defaults to `False`):
            Read half of the request body, then close the connection without answering (a connection lost mid-upload).
        truncate (`bool`, *optional*, defaults to `False`):
            Handle the request, but close the connection halfway through the response body (a download cut off);
            recorded with status `-2`.
        message (`str`, *optional*):
            Error message of the answer (`{"error": message}`); a generic one when not given.
        gate (`threading.Event`, *optional*):
            Hold the request until the event is set (at most 10 s); with `status=0` it is then handled normally.
    """

    method: str
    path: str
    status: int = 503
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    truncate: bool = False
    message: str | None = None
    gate: threading.Event | None = None
    hits: int = 0


@dataclass
class Request:
    """One request as the server saw it: method, path (no query), query, status answered, whether a token came."""

    method: str
    path: str
    query: dict[str, list[str]]
    status: int
    authorized: bool
    served: bool = True
    range: str | None = None


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code


def _sha(data: bytes, kind: str = "sha1") -> str:
    return hashlib.new(kind, data).hexdigest()


class Repo:
    """A repository on disk: `repo.json` (private flag, commits, refs) next to the server's blob store."""

    def __init__(self, path: Path, blobs: Path):
        self.path = path
        self.blobs = blobs
        self.meta = json.loads(path.read_text())

    @classmethod
    def create(cls, path: Path, blobs: Path, repo_type: str, repo_id: str, private: bool) -> Repo:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"type": repo_type, "id": repo_id, "private": private, "commits": {}, "refs": {}, "tags": {}}
        path.write_text(json.dumps(meta))
        repo = cls(path, blobs)
        repo.commit("main", "initial commit", {}, parent=None)
        return repo

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta))
        tmp.replace(self.path)

    def resolve(self, revision: str) -> str:
        """The commit sha of a branch, tag or sha; `HubError` 404 `RevisionNotFound` otherwise."""
        revision = unquote(revision)
        if revision in self.meta["refs"]:
            return self.meta["refs"][revision]
        if revision in self.meta["tags"]:
            return self.meta["tags"][revision]
        if revision in self.meta["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def files(self, sha: str) -> dict[str, str]:
        """Path -> blob sha256 of a commit."""
        return self.meta["commits"][sha]["files"]

    def read(self, blob: str) -> bytes:
        return (self.blobs / blob).read_bytes()

    def store(self, data: bytes) -> str:
        blob = _sha(data, "sha256")
        target = self.blobs / blob
        if not target.exists():
            tmp = target.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return blob

    def commit(
        self,
        branch: str,
        message: str,
        additions: dict[str, bytes],
        *,
        deletions: tuple[str, ...] = (),
        parent: str | None = "auto",
    ) -> str:
        parent_sha = self.meta["refs"].get(branch) if parent == "auto" else parent
        files = dict(self.files(parent_sha)) if parent_sha else {}
        for path in deletions:
            files = {p: b for p, b in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        for path, data in additions.items():
            files[path] = self.store(data)
        body = json.dumps({"parent": parent_sha, "message": message, "files": files, "t": time.time_ns()})
        sha = _sha(body.encode())
        self.meta["commits"][sha] = {"parent": parent_sha, "message": message, "files": files}
        self.meta["refs"][branch] = sha
        self.save()
        return sha


class HubServer:
    """
    The Hub test server: repositories under `root`, listening on 127.0.0.1 on a free port.

    Args:
        root (`Path`):
            Folder for the repositories and blobs.
        tokens (`dict[str, str]`, *optional*):
            Valid tokens -> user name; requests with another token get 401.
        orgs (`tuple[str, ...]`, *optional*, defaults to `("org",)`):
            Namespaces every user may write to besides their own; writes elsewhere get 403.
    """

    def __init__(self, root: Path, tokens: dict[str, str] | None = None, orgs: tuple[str, ...] = ("org",)):
        self.orgs = tuple(orgs)
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {})
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    # Repositories -----------------------------------------------------------------------------------------------
    def _repo_path(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / f"{repo_id}.json"

    def repo(self, repo_type: str, repo_id: str) -> Repo | None:
        path = self._repo_path(repo_type, repo_id)
        return Repo(path, self.blobs) if path.exists() else None

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        with self._lock:
            return Repo.create(self._repo_path(repo_type, repo_id), self.blobs, repo_type, repo_id, private)

    def publish(
        self,
        repo_id: str,
        files: dict[str, bytes | str | Path],
        *,
        repo_type: str = "model",
        branch: str = "main",
        message: str = "publish",
        private: bool = False,
    ) -> str:
        """
        Commit files to a branch (created from `main` when missing; the repository too), as a test's set-up.

        Returns:
            `str`: The new commit sha.
        """

        def as_bytes(value: bytes | str | Path) -> bytes:
            if isinstance(value, Path):
                return value.read_bytes()
            return value.encode() if isinstance(value, str) else value

        with self._lock:
            repo = self.repo(repo_type, repo_id) or self.create_repo(repo_id, repo_type, private)
            if branch not in repo.meta["refs"]:
                repo.meta["refs"][branch] = repo.meta["refs"]["main"]
            return repo.commit(branch, message, {path: as_bytes(data) for path, data in files.items()})

    def publish_folder(self, repo_id: str, folder: Path, **kwargs) -> str:
        """[`publish`] every file under a folder, keeping its relative paths."""
        files = {p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        return self.publish(repo_id, files, **kwargs)

    def files_at(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content of a repository at a revision (for assertions)."""
        repo = self.repo(repo_type, repo_id)
        assert repo is not None, f"no {repo_type} repository {repo_id} on the test Hub"
        return {path: repo.read(blob) for path, blob in repo.files(repo.resolve(revision)).items()}

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        repo = self.repo(repo_type, repo_id)
        return dict(repo.meta["refs"]) if repo else {}

    def commit_messages(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit titles from the tip of `revision` back to the first commit."""
        repo = self.repo(repo_type, repo_id)
        sha, messages = repo.resolve(revision), []
        while sha:
            messages.append(repo.meta["commits"][sha]["message"])
            sha = repo.meta["commits"][sha]["parent"]
        return messages

    def reset(self) -> None:
        """Forget every repository, fault and recorded request."""
        with self._lock:
            shutil.rmtree(self.root / "repos", ignore_errors=True)
            self.faults.clear()
            self.requests.clear()

    # Faults and records -----------------------------------------------------------------------------------------
    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.method == method and fault.hits < fault.times and re.search(fault.path, path):
                    fault.hits += 1
                    return fault
        return None

    def endpoints(self) -> list[str]:
        """The requests seen, as `METHOD path -> status`, in order."""
        return [f"{r.method} {r.path} -> {r.status}" for r in self.requests]

    def unserved(self) -> list[str]:
        """Requests for endpoints the server does not implement: a client that changed what it calls."""
        return [f"{r.method} {r.path}" for r in self.requests if not r.served]

    def hits(self, method: str, pattern: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]


# ---------------------------------------------------------------------------------------------------------------------
# The HTTP side
# ---------------------------------------------------------------------------------------------------------------------
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"
_API_ROUTES = [
    ("GET", re.compile(rf"^/api/(?P<kind>models|datasets)/{_REPO}(?:/revision/{_REV})?$"), "repo_info"),
    ("GET", re.compile(rf"^/api/(?P<kind>models|datasets)/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?$"), "tree"),
    ("POST", re.compile(rf"^/api/(?P<kind>models|datasets)/{_REPO}/paths-info/{_REV}$"), "paths_info"),
    ("GET", re.compile(rf"^/api/(?P<kind>models|datasets)/{_REPO}/refs$"), "refs"),
    ("POST", re.compile(rf"^/api/(?P<kind>models|datasets)/{_REPO}/preupload/{_REV}$"), "preupload"),
    ("POST", re.compile(rf"^/api/(?P<kind>models|datasets)/{_REPO}/commit/{_REV}$"), "commit"),
    ("POST", re.compile(rf"^/api/(?P<kind>models|datasets)/{_REPO}/branch/{_REV}$"), "create_branch"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
]
_RESOLVE = re.compile(rf"^/(?:(?P<kind>datasets|spaces)/)?{_REPO}/resolve/{_REV}/(?P<path>.+)$")


def _handler_for(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        hub = server

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    # Dispatch ---------------------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        self._status = 0
        self._body_read = False
        self._truncate = False
        token = self._token()
        authorized = token is not None and token in self.hub.tokens
        record = self._record = Request(method, path, query, 0, authorized, range=self.headers.get("Range"))
        with self.hub._lock:
            self.hub.requests.append(record)
        try:
            fault = self.hub._take_fault(method, path)
            if fault is not None and fault.gate is not None:
                fault.gate.wait(10)
            if fault is not None and fault.drop:
                self._drop_connection()
                record.status = -1
                return
            self._truncate = fault is not None and fault.truncate
            if fault is not None and fault.status and not fault.truncate:
                record.status = fault.status
                message = fault.message or f"injected {fault.status}"
                self._json(fault.status, {"error": message}, {"X-Error-Message": message, **fault.headers})
                return
            if token is not None and token not in self.hub.tokens:
                raise HubError(401, "Invalid credentials in Authorization header")
            self._route(method, path, query)
        except HubError as error:
            headers = {"X-Error-Message": str(error)}  # as the Hub sends it; the client quotes it
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            self._json(error.status, {"error": str(error)}, headers)
        record.status = -2 if self._truncate else self._status

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        lookup = "GET" if method == "HEAD" else method
        match = _RESOLVE.match(path)
        if match and lookup == "GET":
            return self._resolve(method, match)
        for route_method, pattern, name in _API_ROUTES:
            match = pattern.match(path)
            if match and route_method == lookup:
                return getattr(self, f"_{name}")(match, query)
        self._record.served = False  # see `HubServer.unserved`
        raise HubError(404, f"not served by the test Hub: {method} {path}")

    # Helpers ----------------------------------------------------------------------------------------------------
    def _token(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return header[len("Bearer ") :].strip() if header.startswith("Bearer ") else None

    def _user(self) -> str | None:
        token = self._token()
        return self.hub.tokens.get(token) if token else None

    def _body(self) -> bytes:
        self._body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _drain(self) -> None:
        if not self._body_read and self.command == "POST":
            self._body()

    def _drop_connection(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(max(1, length // 2))
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, head: bool = False) -> None:
        self._drain()
        self._status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if self._truncate:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, head=self.command == "HEAD")

    def _repo(self, kind: str | None, repo_id: str) -> Repo:
        """The repository, or 401 `RepoNotFound` as the Hub answers for a missing or inaccessible one."""
        repo_type = _TYPES.get(kind or "models", "model")
        repo = self.hub.repo(repo_type, unquote(repo_id))
        if repo is None or (repo.meta["private"] and self._user() is None):
            raise HubError(401, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
        return repo

    def _check_namespace(self, repo_id: str) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository.")
        namespace = repo_id.split("/")[0]
        if namespace != user and namespace not in self.hub.orgs:
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace!r}.")

    def _writable(self, kind: str, repo_id: str) -> Repo:
        repo = self._repo(kind, repo_id)
        self._check_namespace(repo.meta["id"])
        return repo

    def _entries(self, repo: Repo, sha: str, prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        files = repo.files(sha)
        entries, folders = [], set()
        for path in sorted(files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            if "/" in rest and not recursive:
                folders.add((f"{prefix}/" if prefix else "") + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for depth in range(1, len(parts) + 1):
                    folders.add((f"{prefix}/" if prefix else "") + "/".join(parts[:depth]))
            entries.append(self._file_entry(repo, path, files[path]))
        dirs = [{"type": "directory", "oid": _sha(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        return dirs + entries

    @staticmethod
    def _file_entry(repo: Repo, path: str, blob: str) -> dict:
        data = repo.read(blob)
        return {"type": "file", "oid": _git_oid(data), "size": len(data), "path": path}

    # API endpoints ----------------------------------------------------------------------------------------------
    def _repo_info(self, match, query) -> None:
        repo = self._repo(match["kind"], match["repo"])
        sha = repo.resolve(match["rev"] or "main")
        repo_id = repo.meta["id"]
        info = {
            "_id": _sha(repo_id.encode())[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": repo.meta["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": path} for path in sorted(repo.files(sha))],
        }
        if match["kind"] == "models":
            info["modelId"] = repo_id
        self._json(200, info)

    def _tree(self, match, query) -> None:
        repo = self._repo(match["kind"], match["repo"])
        sha = repo.resolve(match["rev"])
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = unquote(match["path"] or "")
        if prefix and not any(p == prefix or p.startswith(prefix + "/") for p in repo.files(sha)):
            raise HubError(404, f"{prefix} does not exist on {match['rev']}", "EntryNotFound")
        self._json(200, self._entries(repo, sha, prefix, recursive))

    def _paths_info(self, match, query) -> None:
        repo = self._repo(match["kind"], match["repo"])
        sha = repo.resolve(match["rev"])
        body = self._body()
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        files, out = repo.files(sha), []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(self._file_entry(repo, path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append({"type": "directory", "oid": _sha(path.encode()), "size": 0, "path": path})
        self._json(200, out)

    def _refs(self, match, query) -> None:
        repo = self._repo(match["kind"], match["repo"])
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo.meta["refs"].items()]
        tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.meta["tags"].items()]
        self._json(200, {"branches": branches, "converts": [], "tags": tags})

    def _preupload(self, match, query) -> None:
        self._writable(match["kind"], match["repo"]).resolve(match["rev"])
        files = json.loads(self._body()).get("files", [])
        self._json(
            200,
            {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
        )

    def _commit(self, match, query) -> None:
        repo = self._writable(match["kind"], match["repo"])
        branch = unquote(match["rev"])
        if branch not in repo.meta["refs"]:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        header, additions, deletions = {}, {}, []
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"])
            else:
                raise HubError(400, f"the test Hub does not take {key!r} operations (files are uploaded as regular)")
        parent = header.get("parentCommit")
        with self.hub._lock:
            repo = self.hub.repo(repo.meta["type"], repo.meta["id"])  # re-read: another commit may have landed
            if parent and parent != repo.meta["refs"][branch]:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            sha = repo.commit(branch, header.get("summary", ""), additions, deletions=tuple(deletions))
        prefix = "" if repo.meta["type"] == "model" else f"{repo.meta['type']}s/"
        self._json(
            200,
            {
                "commitUrl": f"{self.hub.url}/{prefix}{repo.meta['id']}/commit/{sha}",
                "commitOid": sha,
                "success": True,
                "pullRequestUrl": None,
            },
        )

    def _create_branch(self, match, query) -> None:
        repo = self._writable(match["kind"], match["repo"])
        branch = unquote(match["rev"])
        body = self._body()
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        with self.hub._lock:
            repo = self.hub.repo(repo.meta["type"], repo.meta["id"])
            if branch in repo.meta["refs"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.meta["refs"][branch] = repo.resolve(start)
            repo.save()
        self._json(200, {})

    def _create_repo(self, match, query) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository.")
        payload = json.loads(self._body())
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        self._check_namespace(repo_id)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.url}/{prefix}{repo_id}"
        with self.hub._lock:
            if self.hub.repo(repo_type, repo_id) is not None:
                return self._json(409, {"error": "You already created this repo", "url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))  # newer / older clients
            self.hub.create_repo(repo_id, repo_type, private)
        self._json(200, {"url": url, "name": repo_id})

    def _whoami(self, match, query) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid user token.")
        self._json(200, {"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token"}})

    def _validate_yaml(self, match, query) -> None:
        """The card metadata check the client runs before committing a README.md (a subset of the Hub's rules)."""
        content = json.loads(self._body()).get("content", "")
        errors = [{"message": message} for message in card_metadata_errors(content)]
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    # Downloads --------------------------------------------------------------------------------------------------
    def _resolve(self, method: str, match) -> None:
        repo = self._repo(match["kind"], match["repo"])
        sha = repo.resolve(match["rev"])
        path = unquote(match["path"])
        blob = repo.files(sha).get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = repo.read(blob)
        etag = f'"{_git_oid(data)}"'
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": etag,
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
        }
        status, body = 200, data
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if ranged and data:
            start_text, end_text = ranged.groups()
            if start_text:
                start, end = int(start_text), min(int(end_text or len(data) - 1), len(data) - 1)
            else:  # a suffix range: the last N bytes
                start, end = max(0, len(data) - int(end_text)), len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=method == "HEAD")
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        self._send(status, body, headers, head=method == "HEAD")


def card_metadata_errors(readme: str) -> list[str]:
    """
    What the Hub would reject in a card's YAML header: a header that is not a mapping, and a `model-index` whose
    results lack a task type, a dataset (type and name) or metrics with a type and a value.
    """
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, re.DOTALL)
    if match is None:
        return []
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"the metadata is not valid YAML: {error}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["the metadata must be a YAML mapping"]
    errors = []
    for i, entry in enumerate(data.get("model-index") or []):
        if not isinstance(entry, dict) or not entry.get("name"):
            errors.append(f'"model-index[{i}].name" is required')
            continue
        for j, result in enumerate(entry.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            if not (result.get("task") or {}).get("type"):
                errors.append(f'"{where}.task.type" is required')
            dataset = result.get("dataset") or {}
            if not dataset.get("type") or not dataset.get("name"):
                errors.append(f'"{where}.dataset" needs a type and a name')
            metrics = result.get("metrics") or []
            if not metrics or any("type" not in m or "value" not in m for m in metrics):
                errors.append(f'"{where}.metrics" needs entries with a type and a value')
    return errors


def _git_oid(data: bytes) -> str:
    """The git blob id of a file, which the Hub sends as the ETag of a non-LFS file."""
    return _sha(b"blob %d\x00" % len(data) + data)


# ---------------------------------------------------------------------------------------------------------------------
# Running the real clients against it
# ---------------------------------------------------------------------------------------------------------------------
_ONLINE_ENV = {
    "HF_HUB_OFFLINE": "0",
    "HF_DATASETS_OFFLINE": "0",
    "TRANSFORMERS_OFFLINE": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    "HF_HUB_ETAG_TIMEOUT": "5",
    "HF_HUB_DOWNLOAD_TIMEOUT": "10",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def _die_with_parent(parent_pid: int) -> None:
    """In the child before exec: SIGKILL it when the test process dies, however it dies."""
    import ctypes
    import os
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def run_client(
    server: HubServer,
    argv: list[str],
    *,
    home: Path,
    token: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    cwd: Path | None = None,
):
    """
    Run a command (`ilr ...`, or `python -c ...`) with the real Hub clients pointed at the server: `HF_ENDPOINT` set
    and offline mode lifted before any Hugging Face library is imported, which only a fresh process allows (they read
    both at import time). The Hugging Face caches go under `home`; `token` becomes `HF_TOKEN`.

    Returns:
        `subprocess.CompletedProcess`: With text `stdout` and `stderr`.
    """
    import functools
    import os
    import subprocess

    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    child_env.update(_ONLINE_ENV)
    child_env.update({"HF_ENDPOINT": server.url, "HF_HOME": str(home / "hf_home"), "NO_PROXY": "127.0.0.1"})
    if token is not None:
        child_env["HF_TOKEN"] = token
    child_env.update(env or {})
    return subprocess.run(
        argv,
        env=child_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=functools.partial(_die_with_parent, os.getpid()),
    )
