"""OpenAI's Batch API on the test server: `/v1/files` (upload, content) and
`/v1/batches` (create, retrieve, list newest first with `after` paging, cancel), with
the states validating -> in_progress -> completed (or failed / expired / cancelled), an
output file and an error file. Tests control it: `hold` keeps new jobs running until
`release()`, `fail_rows` fails those requests, `expire_after` answers only that many
requests of a job and then expires it, and `on_upload()` (inside an upload, before the
file is kept) and `on_create(phase)` (inside the create call: "before" the job exists,
"after" it exists but before the answer is sent) are where a test kills its client."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import default
from typing import Any


class BatchAPI:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.hold = True  # jobs stay in_progress until release()
        self.fail_rows: set[str] = set()  # custom_ids the job fails
        self.expire_after: int | None = None
        self.on_create: Callable[[str], None] | None = None
        self.on_upload: Callable[[], None] | None = None  # inside an upload, before storing
        self.creates = 0  # batch create calls that made a job
        self.uploads = 0
        self.answered = 0  # requests answered inside jobs
        self.calls = 0  # every call to /v1/files and /v1/batches

    # -- test controls --------------------------------------------------------------------

    def release(self) -> None:
        """Let every job run to its end on its next retrieve."""
        self.hold = False

    def jobs(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.batches.values())

    # -- the endpoints --------------------------------------------------------------------

    def post(self, path: str, content_type: str, raw: bytes) -> tuple[int, bytes]:
        self.calls += 1
        if path == "/v1/files":
            return self._upload(content_type, raw)
        if path == "/v1/batches":
            return self._create(json.loads(raw))
        if path.startswith("/v1/batches/") and path.endswith("/cancel"):
            with self.lock:
                b = self.batches.get(path.split("/")[3])
                if b is None:
                    return 404, b'{"error":"no such batch"}'
                if b["status"] in ("validating", "in_progress"):
                    b["status"] = "cancelled"
                return 200, json.dumps(b).encode()
        return 404, b'{"error":"not found"}'

    def get(self, path: str) -> tuple[int, bytes]:
        self.calls += 1
        route, _, query = path.partition("?")
        parts = route.split("/")
        if route == "/v1/batches":
            return 200, json.dumps(self._list(query)).encode()
        if route.startswith("/v1/batches/") and len(parts) == 4:
            with self.lock:
                b = self.batches.get(parts[3])
                if b is None:
                    return 404, b'{"error":"no such batch"}'
                self._advance(b)
                return 200, json.dumps(b).encode()
        if route.startswith("/v1/files/") and route.endswith("/content"):
            data = self.files.get(parts[3])
            return (200, data) if data is not None else (404, b'{"error":"no such file"}')
        return 404, b'{"error":"not found"}'

    def _upload(self, content_type: str, raw: bytes) -> tuple[int, bytes]:
        msg = BytesParser(policy=default).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw
        )
        fields = {
            part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in msg.iter_parts()
        }
        if fields.get("purpose") != b"batch" or not fields.get("file"):
            return 400, b'{"error":"need purpose=batch and a file"}'
        if self.on_upload:
            self.on_upload()
        with self.lock:
            file_id = f"file-{next(self.ids)}"
            self.files[file_id] = fields["file"]
            self.uploads += 1
        return 200, json.dumps({"id": file_id, "object": "file", "purpose": "batch"}).encode()

    def _create(self, req: dict[str, Any]) -> tuple[int, bytes]:
        if req.get("input_file_id") not in self.files:
            return 400, b'{"error":"unknown input_file_id"}'
        if self.on_create:
            self.on_create("before")
        with self.lock:
            lines = self.files[req["input_file_id"]].decode().splitlines()
            b = {
                "id": f"batch_{next(self.ids)}",
                "object": "batch",
                "endpoint": req.get("endpoint"),
                "input_file_id": req["input_file_id"],
                "completion_window": req.get("completion_window"),
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": int(time.time()),
                "metadata": req.get("metadata") or {},
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            }
            self.batches[b["id"]] = b
            self.creates += 1
        if self.on_create:
            self.on_create("after")
        return 200, json.dumps(b).encode()

    def _list(self, query: str) -> dict[str, Any]:
        args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        limit = int(args.get("limit", 20))
        with self.lock:
            ordered = sorted(self.batches.values(), key=lambda b: -int(b["id"].split("_")[1]))
        if "after" in args:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(args["after"]) + 1 :] if args["after"] in ids else []
        page = ordered[:limit]
        return {"object": "list", "data": page, "has_more": len(ordered) > limit}

    def _advance(self, b: dict[str, Any]) -> None:
        """validating -> in_progress on the first look; then, once released, the end."""
        if b["status"] == "validating":
            b["status"] = "in_progress"
            return
        if b["status"] != "in_progress" or self.hold:
            return
        out, errors = [], []
        lines = self.files[b["input_file_id"]].decode().splitlines()
        for n, line in enumerate(lines):
            item = json.loads(line)
            if self.expire_after is not None and n >= self.expire_after:
                break
            if item["custom_id"] in self.fail_rows:
                errors.append(
                    {
                        "custom_id": item["custom_id"],
                        "response": {"status_code": 500, "body": {"error": "boom"}},
                        "error": None,
                    }
                )
                continue
            body = self.server.chat_answer(item["body"])
            out.append(
                {"custom_id": item["custom_id"], "response": {"status_code": 200, "body": body}}
            )
            self.answered += 1
        for kind, rows in (("output_file_id", out), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{next(self.ids)}"
                self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                b[kind] = file_id
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errors)}
        b["status"] = "expired" if self.expire_after is not None else "completed"
