"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests and benchmarks:
deterministic answers, request counting, and failures on demand (429 with Retry-After,
500, slow responses, malformed JSON)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LLMServer:
    def __init__(self, latency: float = 0.0, port: int = 0) -> None:
        self.latency = latency
        self.lock = threading.Lock()
        self.requests = 0
        self.not_found = 0  # POSTs to a path the server does not have (404)
        self.by_prompt: Counter[str] = Counter()
        self.bodies: list[dict] = []  # every request body, as received
        self.reply = None  # a function (request body) -> answer text, instead of the echo
        # /v1/completions: a function (prompt) -> text; default "Question N?" (N counts
        # completion requests) followed by an end-of-turn marker and more, as a model
        # that runs on past its turn writes.
        self.complete = None
        self.completions = 0
        self.auth_headers: set[str] = set()
        self.fail_429 = 0  # the next N requests get 429 with Retry-After
        self.fail_500 = 0
        self.malformed = 0
        self.slow = 0  # the next N requests take `slow_seconds`
        self.slow_seconds = 5.0
        self.always_fail = "\x00never"  # prompts containing this always get 500
        self.usage = True  # False: answers carry no `usage` (some servers send none)
        # The default listen backlog (5) drops a burst of 32 new connections into SYN
        # retransmits of a second.
        ThreadingHTTPServer.request_queue_size = 256
        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        from tests.batch_api import BatchAPI

        self.batch_api = BatchAPI(self)

    def start(self) -> LLMServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _take(self, name: str) -> bool:
        with self.lock:
            n = getattr(self, name)
            if n > 0:
                setattr(self, name, n - 1)
                return True
            return False

    def embeddings(self, handler: BaseHTTPRequestHandler, req: dict) -> None:
        """/v1/embeddings: a vector per input (`vector`), counted like a chat request."""
        texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
        with self.lock:
            self.requests += 1
            self.bodies.append(req)
        if any(self.always_fail in t for t in texts):
            return handler._send(500, b'{"error":"boom"}')  # type: ignore[attr-defined]
        body = json.dumps(embeddings_answer(req["model"], texts)).encode()
        return handler._send(200, body)  # type: ignore[attr-defined]

    def chat(self, handler: Any, req: dict) -> None:
        """/v1/chat/completions, with the failures tests ask for."""
        prompt = req["messages"][-1]["content"]
        with self.lock:
            self.requests += 1
            self.by_prompt[prompt] += 1
            self.bodies.append(req)
            self.auth_headers.add(handler.headers.get("Authorization", ""))
        if self.latency:
            time.sleep(self.latency)
        if self._take("slow"):
            time.sleep(self.slow_seconds)
        if self._take("fail_429"):
            return handler._send(429, b'{"error":"rate limited"}', {"Retry-After": "0.05"})
        if self._take("fail_500") or self.always_fail in prompt:
            return handler._send(500, b'{"error":"boom"}')
        if self._take("malformed"):
            return handler._send(200, b'{"choices": [ not json')
        return handler._send(200, json.dumps(self.chat_answer(req)).encode())

    def chat_answer(self, req: dict) -> dict:
        """The chat completion the server answers `req` with (live or in a batch job)."""
        prompt = req["messages"][-1]["content"]
        text = (
            self.reply(req) if self.reply is not None else f"answer({req['model']}): {prompt[::-1]}"
        )
        words = len(prompt.split())
        answer = {
            "id": "cmpl-test",
            "object": "chat.completion",
            "model": req["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {
                "prompt_tokens": words,
                "completion_tokens": words + 2,
                "total_tokens": 2 * words + 2,
            },
        }
        if not self.usage:
            del answer["usage"]
        return answer

    def completion(self, handler: BaseHTTPRequestHandler, req: dict) -> None:
        """/v1/completions: raw text completion of `prompt`, counted like a chat request."""
        with self.lock:
            self.requests += 1
            self.completions += 1
            self.by_prompt[req["prompt"]] += 1
            self.bodies.append(req)
            n = self.completions
        if self.always_fail in req["prompt"]:
            return handler._send(500, b'{"error":"boom"}')  # type: ignore[attr-defined]
        text = (
            self.complete(req["prompt"])
            if self.complete is not None
            else f" Question {n}?<|eot_id|><|start_header_id|>assistant"
        )
        body = {
            "object": "text_completion",
            "model": req["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }
        return handler._send(200, json.dumps(body).encode())  # type: ignore[attr-defined]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle on, the second waits for a
            # delayed ACK (40 ms), which would double a 50 ms latency.
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed (a crash test): nobody to answer

            def do_GET(self) -> None:
                if self.path.startswith(("/v1/files", "/v1/batches")):
                    code, body = server.batch_api.get(self.path)
                    return self._send(code, body)
                return self._send(404, b'{"error":"not found"}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path.startswith(("/v1/files", "/v1/batches")):
                    ctype = self.headers.get("Content-Type", "")
                    code, body = server.batch_api.post(self.path, ctype, raw)
                    return self._send(code, body)
                req = json.loads(raw)
                routes = {
                    "/v1/embeddings": server.embeddings,
                    "/v1/completions": server.completion,
                    "/v1/chat/completions": server.chat,
                }
                if self.path not in routes:
                    with server.lock:
                        server.not_found += 1
                    return self._send(404, b'{"error":"not found"}')
                return routes[self.path](self, req)

        return Handler


def kill_after_requests(server: LLMServer, n: int, proc, timeout: float = 60) -> int:
    """SIGKILL `proc` once the server has had `n` requests; returns the count then."""
    import signal

    deadline = time.monotonic() + timeout
    while server.requests < n and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return server.requests


def vector(text: str) -> list[float]:
    """The test server's embedding of a text: [length, words, first code point]."""
    return [float(len(text)), float(len(text.split())), float(ord(text[0]) if text else 0)]


def embeddings_answer(model: str, texts: list[str]) -> dict:
    data = [
        {"object": "embedding", "index": i, "embedding": vector(t)} for i, t in enumerate(texts)
    ]
    tokens = sum(len(t.split()) for t in texts)
    return {
        "object": "list",
        "model": model,
        "data": data[::-1],  # any order: the client sorts by index
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
