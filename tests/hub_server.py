"""A Hugging Face Hub stand-in on 127.0.0.1 for dataset repos: the endpoints that
`huggingface_hub.HfApi.dataset_info` and `datasets.load_dataset` call (repo info,
file tree, file download), served from commits held in memory. Point a process at it
with HF_ENDPOINT (read when huggingface_hub is imported, so: a subprocess)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from typing import Any


class HubServer:
    def __init__(self) -> None:
        self.commits: dict[str, dict[str, bytes]] = {}  # commit -> {path: bytes}
        self.branches: dict[str, dict[str, str]] = {}  # repo -> {branch: commit}
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> HubServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit(self, repo: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit of `files` on `branch`; its 40-hex id."""
        parent = self.branches.get(repo, {}).get(branch, "")
        h = hashlib.sha1(f"{repo}\0{parent}\0{len(self.commits)}".encode())
        for path, data in sorted(files.items()):
            h.update(path.encode() + b"\0" + hashlib.sha1(data).digest())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        self.branches.setdefault(repo, {})[branch] = sha
        return sha

    def _commit_of(self, repo: str, revision: str) -> str | None:
        revision = urllib.parse.unquote(revision)
        if revision in self.commits:
            return revision
        return self.branches.get(repo, {}).get(revision)

    def _send(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        code: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        handler.send_response(code)
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _json(self, handler: Any, doc: Any, head: bool) -> None:
        body = json.dumps(doc).encode()
        self._send(handler, 200, body, {"Content-Type": "application/json"}, head)

    def _serve(self, handler: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        url = urllib.parse.urlparse(handler.path)
        self.requests.append(f"{handler.command} {url.path}")
        parts = url.path.strip("/").split("/")
        missing = {"X-Error-Code": "RepoNotFound"}
        if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            rest = parts[4:]
            revision = rest[1] if len(rest) >= 2 else "main"
            sha = self._commit_of(repo, revision)
            if sha is None:
                code = "RevisionNotFound" if repo in self.branches else "RepoNotFound"
                return self._send(handler, 404, b"{}", {"X-Error-Code": code}, head)
            files = self.commits[sha]
            if not rest or rest[0] == "revision":
                siblings = [{"rfilename": f} for f in sorted(files)]
                return self._json(
                    handler,
                    {"id": repo, "sha": sha, "siblings": siblings, "private": False, "tags": []},
                    head,
                )
            if rest[0] == "tree":
                return self._json(handler, self._tree(files, "/".join(rest[2:]), url), head)
        if parts[:1] == ["datasets"] and "resolve" in parts:
            i = parts.index("resolve")
            repo = "/".join(parts[1:i])
            sha = self._commit_of(repo, parts[i + 1]) if len(parts) > i + 1 else None
            path = urllib.parse.unquote("/".join(parts[i + 2 :]))
            if sha is None or path not in self.commits[sha]:
                return self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            data = self.commits[sha][path]
            etag = f'"{hashlib.sha1(data).hexdigest()}"'
            headers = {"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "text/plain"}
            return self._send(handler, 200, data, headers, head)
        return self._send(handler, 404, b"", missing, head)

    @staticmethod
    def _tree(files: dict[str, bytes], under: str, url: urllib.parse.ParseResult) -> list:
        recursive = "recursive=true" in url.query.lower()
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        prefix = f"{under}/" if under else ""
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            oid = hashlib.sha1(data).hexdigest()
            out.append({"type": "file", "path": path, "size": len(data), "oid": oid})
        out += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders]
        return out
