"""An async client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM,
llama.cpp server, Ollama, TGI, …), built on aiohttp.

aiohttp rather than httpx: against the same local server at 32 concurrent requests it
sustained 601 requests/s vs httpx's 483 (httpcore rescans its pool on every request), and
it already comes with datasets.

All requests of a process go through one event loop in a daemon thread, so the cap on
concurrent requests holds across every batch in flight and connections are pooled.
Retries: 429, 5xx, timeouts, connection errors and malformed responses, with exponential
backoff and full jitter, honouring `Retry-After`.

The API key is a `SecretStr`, read from `api_key_env` (default OPENAI_API_KEY) when not
given; it is excluded from every dump, so it never reaches a hash, pipeline.yaml or a log.

Structured output: `structured_output` (a JSON schema, or a pydantic model whose schema is
taken) is sent as `response_format` and every answer is validated against it; an answer
that is not JSON or breaks the schema is asked again like a malformed response, and a row
whose retries are spent fails like any other.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import email.utils
import functools
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from castore import jobctx
from castore.answers import BatchAnswers, request_key
from castore.errors import LLMError, LLMRefused, LLMUnreachable, RequestAbandoned

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# What every request shares (the key, its rights, the model, the path): when each request
# of a batch gets one, the run stops (LLMRefused). A 400 can be one row's (too long).
REFUSED_STATUS = {401, 403, 404}
_KEPT = "; the rows answered so far are kept, and running again continues"


class Generation(BaseModel):
    """One completion: the text, the raw response and the token usage."""

    text: str | None
    raw: dict[str, Any]
    usage: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 1
    # This answer's token in the run's journal of answers (castore.answers), so a step
    # that finds it unusable can take it back.
    answer_token: str | None = Field(default=None, exclude=True, repr=False)


class Prices(BaseModel):
    """What you pay for a model, in USD per million tokens: castore keeps no price list
    (prices change, and a stale one would be a guess), so cost estimates use yours."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, description="USD per 1M prompt tokens.")
    output: float = Field(ge=0, description="USD per 1M completion tokens.")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


def usage_totals(usages: Iterable[Any]) -> tuple[int, int, int]:
    """(total, prompt, completion) tokens of servers' `usage` dicts; anything not a dict,
    or a count that is not an int, counts nothing."""
    total = prompt = completion = 0
    for usage in usages:
        if isinstance(usage, dict):
            total += _count(usage.get("total_tokens"))
            prompt += _count(usage.get("prompt_tokens"))
            completion += _count(usage.get("completion_tokens"))
    return total, prompt, completion


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class OpenAILLM(BaseModel):
    """Chat completions at `base_url` (…/v1). `cache_identity()` is what enters a step's
    fingerprint: the model, the generation kwargs and the server (a different server may
    serve a different model under the same name), never the key or the timeouts."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = Field(default=None, exclude=True)
    api_key_env: str = "OPENAI_API_KEY"
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_concurrent_requests: int = 32
    structured_output: dict[str, Any] | None = Field(
        default=None,
        description="A JSON schema (or a pydantic model class) every answer must match.",
    )
    offline_batch: bool = Field(
        default=False,
        description="Send a step's missing rows as one batch job (/v1/batches) instead of "
        "live requests; the run ends `waiting` until the provider finished it.",
    )
    prices: Prices | None = Field(
        default=None,
        description="USD per 1M tokens for this model ({'input': ..., 'output': ...}; with "
        "offline_batch, the batch price): `cas jobs` estimates each job's cost with it. "
        "Not part of the cache key.",
    )
    offline_failed: Literal["new_job", "live"] = Field(
        default="new_job",
        description="Rows a batch job failed or left unanswered: asked again in a new job "
        "by the next run ('new_job'), or at once with live requests ('live').",
    )

    @field_validator("structured_output", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> Any:
        """A pydantic model stands for its JSON schema: the schema is what is sent, hashed
        and recorded in pipeline.yaml, so a run from that file validates the same way."""
        if isinstance(value, type) and issubclass(value, BaseModel):
            value = value.model_json_schema()
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("structured_output must be a JSON schema (dict) or a pydantic model")
        import jsonschema

        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as e:
            raise ValueError(f"structured_output is not a valid JSON schema: {e.message}") from None
        return value

    @field_validator("generation_kwargs")
    @classmethod
    def _openai_names(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """distilabel's `max_new_tokens` is the API's `max_tokens`: renamed here, so both
        spellings send (and cache) the same request."""
        if "max_new_tokens" not in kwargs:
            return kwargs
        if "max_tokens" in kwargs:
            raise ValueError("generation_kwargs has max_new_tokens and max_tokens: keep one")
        out = dict(kwargs)
        out["max_tokens"] = out.pop("max_new_tokens")
        return out

    def cache_identity(self) -> dict[str, Any]:
        out = {
            "model": self.model,
            "base_url": self.base_url.rstrip("/"),
            "generation_kwargs": self.generation_kwargs,
        }
        if self.structured_output is not None:  # absent otherwise: earlier keys stand
            out["structured_output"] = self.structured_output
        return out

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(self.api_key_env)

    # -- synchronous entry points (called from batch worker threads) -------------------

    def generate(
        self, conversations: list[list[dict[str, Any]]]
    ) -> list[Generation | BaseException]:
        """One result per conversation, in order: a Generation, or the exception that
        ended its retries. Requests run concurrently up to `max_concurrent_requests`."""
        parse = self.chat_parser()
        return self._post_each(
            "/chat/completions", [self.chat_body(c) for c in conversations], parse
        )

    def complete(self, prompts: list[str]) -> list[Generation | BaseException]:
        """Raw text completions (`/completions`: the prompt is sent as is, no chat
        template applied), one result per prompt, in order, as `generate`'s."""
        bodies = [{"model": self.model, "prompt": p, **self.generation_kwargs} for p in prompts]
        return self._post_each("/completions", bodies, _parse_completion)

    def chat_body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The chat-completions body for `messages` (live requests and batch jobs send the
        same body, and read the answer with `chat_parser()`)."""
        body = {"model": self.model, "messages": messages, **self.generation_kwargs}
        if self.structured_output is not None:
            body["response_format"] = response_format(self.structured_output)
        return body

    def chat_parser(self) -> Callable[[str], Generation | None]:
        """The parser of a chat answer: with structured output, one that checks the
        schema (its validator built once per schema, not per request)."""
        if self.structured_output is None:
            return _parse
        return _structured_parser(json.dumps(self.structured_output, sort_keys=True))

    def _post_each(
        self, path: str, bodies: list[dict[str, Any]], parse: Any
    ) -> list[Any | BaseException]:
        """Each body POSTed to `path` (retried by `_post`), concurrently up to the cap;
        one result or exception per body, in order."""

        # Read here: the loop's thread has another context.
        abandon, answers = jobctx.ABANDON.get(), jobctx.ANSWERS.get()

        url = self.base_url.rstrip("/") + path

        def one(client: Any, sem: asyncio.Semaphore, body: dict[str, Any]) -> Awaitable[Any]:
            post = functools.partial(self._post, client, sem, path, body, parse)
            request = request_key(url, body) if answers is not None else None
            if answers is None or request is None:
                return post()
            return _through(answers, request, parse, post)

        async def go() -> list[Any | BaseException]:
            client, sem = _LOOP.client(self), _LOOP.semaphore(self)
            posts = (one(client, sem, b) for b in bodies)
            if abandon is None:
                return await asyncio.gather(*posts, return_exceptions=True)
            return await _until_abandoned([asyncio.ensure_future(p) for p in posts], abandon)

        out: list[Any | BaseException] = _LOOP.run(go())
        if out and all(isinstance(r, LLMUnreachable) for r in out):
            raise LLMUnreachable(
                f"cannot reach the LLM server at {self.base_url}: {len(out)} request(s) "
                f"could not connect ({out[-1]}); start it, or check base_url "
                f"(OPENAI_BASE_URL){_KEPT}"
            )
        if out and all(isinstance(r, LLMRefused) for r in out):
            raise LLMRefused(
                f"the LLM server at {self.base_url} refused every request ({out[-1]}); check "
                f"the API key (OPENAI_API_KEY), the model name and base_url{_KEPT}"
            )
        return out

    def embed(self, texts: list[str]) -> Embeddings:
        """One vector per text, in order, from `/embeddings` in one request (retried like
        a chat completion); raises LLMError when its retries are spent."""
        body = {"model": self.model, "input": texts, **self.generation_kwargs}

        async def go() -> Embeddings:
            client, sem = _LOOP.client(self), _LOOP.semaphore(self)
            return await self._post(client, sem, "/embeddings", body, _parse_embeddings(len(texts)))

        result: Embeddings = _LOOP.run(go())
        return result

    async def _post(
        self,
        client: Any,
        sem: asyncio.Semaphore,
        path: str,
        body: dict[str, Any],
        parse: Any,
        *,
        on_answer: Callable[[str], None] = lambda _text: None,
    ) -> Any:
        """POST `body` to `path` with retries (429/5xx/timeouts, Retry-After honoured, full
        jitter); `parse(text)` gives the result, or None for a malformed answer, or raises
        Unusable for an answer to ask again at once (it broke the schema). `on_answer`
        is given the text of the answer returned."""
        import aiohttp

        headers = {"Content-Type": "application/json"}
        key = self.key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url.rstrip("/") + path
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        last = "no attempt"
        never_connected = True  # every attempt failed to connect: nothing answers there
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            async with sem:
                try:
                    async with client.post(
                        url, json=body, headers=headers, timeout=timeout
                    ) as resp:
                        status, text = resp.status, await resp.text()
                        retry_after = resp.headers.get("Retry-After")
                except (TimeoutError, aiohttp.ClientError) as e:
                    last = f"{type(e).__name__}: {e}"
                    never_connected &= isinstance(e, aiohttp.ClientConnectorError)
                else:
                    never_connected = False
                    if status == 200:
                        try:
                            gen = parse(text)
                        except Unusable as e:
                            gen, last, wait = None, str(e), 0.0  # the server is fine
                        else:
                            last = f"malformed response (not {path} JSON)"
                        if gen is not None:
                            gen.attempts = attempt + 1
                            on_answer(text)
                            return gen
                    elif status in RETRY_STATUS:
                        last = f"HTTP {status}: {text[:200]}"
                        wait = _retry_after(retry_after)
                    else:
                        error = LLMRefused if status in REFUSED_STATUS else LLMError
                        raise error(f"HTTP {status} from {url}: {text[:300]}")
            if attempt == self.max_retries:
                break
            backoff = min(self.max_backoff, self.backoff * 2**attempt)
            delay = wait if wait is not None else random.uniform(0, backoff)  # full jitter
            log.debug("retry %d/%d in %.2fs: %s", attempt + 1, self.max_retries, delay, last)
            await asyncio.sleep(delay)
        error = LLMUnreachable if never_connected else LLMError
        raise error(f"{self.max_retries + 1} attempts failed; last: {last}")


async def _through(
    answers: BatchAnswers, request: str, parse: Any, post: Callable[..., Awaitable[Any]]
) -> Any:
    """`post()` through the run's `answers` (castore.answers): an answer a killed run
    received for this exact `request` is used instead of sending it again, and each
    answer that comes is recorded as it comes."""
    kept = answers.recovered(request)
    if kept is not None:
        with contextlib.suppress(Unusable):
            gen = parse(kept[0])
            if gen is not None:
                gen.attempts, gen.answer_token = 0, kept[1]  # 0: no request sent
                return gen
    tokens: list[str] = []
    got = await post(on_answer=lambda text: tokens.append(answers.record(request, text)))
    if isinstance(got, Generation) and tokens:
        got.answer_token = tokens[-1]
    return got


# How often a batch's requests look whether their run gave them up.
_ABANDON_POLL = 0.05


async def _until_abandoned(
    tasks: list[asyncio.Future[Any]], abandon: threading.Event
) -> list[Any | BaseException]:
    """Each task's result or exception, in order, as asyncio.gather(return_exceptions=True)
    gives them; once `abandon` is set, the tasks not done are cancelled (a request
    waiting for its turn is never sent, one on the wire is dropped) and stand as
    RequestAbandoned."""
    pending: set[asyncio.Future[Any]] = set(tasks)
    while pending and not abandon.is_set():
        _done, pending = await asyncio.wait(pending, timeout=_ABANDON_POLL)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    gone = RequestAbandoned("not answered: the run was stopped before the answer came")
    return [gone if t.cancelled() else (t.exception() or t.result()) for t in tasks]


class Unusable(Exception):
    """A well-formed response whose answer cannot be used (it breaks the schema)."""


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The chat API's `response_format` for `schema` (its name: the schema's title, in the
    characters the API allows)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "output"))[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


@functools.lru_cache(maxsize=32)
def _structured_parser(schema_json: str) -> Callable[[str], Generation | None]:
    import jsonschema

    schema = json.loads(schema_json)
    validator = jsonschema.validators.validator_for(schema)(schema)

    def parse(text: str) -> Generation | None:
        gen = _parse(text)
        if gen is None:
            return None
        try:
            value = json.loads(gen.text or "")
        except ValueError:
            raise Unusable(f"answer is not JSON: {(gen.text or '')[:120]!r}") from None
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the answer"
            raise Unusable(f"answer breaks the schema at {where}: {error.message[:200]}")
        # One spelling of the same object in the dataset; raw_response keeps the server's.
        gen.text = json.dumps(value, ensure_ascii=False)
        return gen

    return parse


def _parse(text: str) -> Generation | None:
    try:
        raw = json.loads(text)
        choice = raw["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if text is not None and not isinstance(text, str):
        return None
    return Generation(text=text, raw=raw, usage=raw.get("usage") or {})


def _parse_completion(text: str) -> Generation | None:
    try:
        raw = json.loads(text)
        out = raw["choices"][0]["text"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(out, str):
        return None
    return Generation(text=out, raw=raw, usage=raw.get("usage") or {})


class Embeddings(BaseModel):
    """The vectors of one `/embeddings` request, in input order."""

    vectors: list[list[float]]
    raw_usage: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 1


def _parse_embeddings(n: int) -> Any:
    def parse(text: str) -> Embeddings | None:
        try:
            raw = json.loads(text)
            data = sorted(raw["data"], key=lambda d: d["index"])
            vectors = [[float(x) for x in d["embedding"]] for d in data]
        except (ValueError, KeyError, TypeError):
            return None
        if len(vectors) != n or [d["index"] for d in data] != list(range(n)):
            return None  # a vector per input, or the answer is not usable
        return Embeddings(vectors=vectors, raw_usage=raw.get("usage") or {})

    return parse


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    when = email.utils.parsedate_to_datetime(value) if value else None
    return max(0.0, when.timestamp() - time.time()) if when else None


class _EventLoop:
    """One asyncio loop in a daemon thread for every request of the process."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._clients: dict[int, Any] = {}
        self._sems: dict[tuple[str, str, int], asyncio.Semaphore] = {}
        self._pid = 0

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            # A forked worker (process executor) inherits the loop object, not its thread.
            if self._loop is None or self._pid != os.getpid() or not self._loop.is_running():
                self._pid = os.getpid()
                loop = asyncio.new_event_loop()
                t = threading.Thread(target=loop.run_forever, daemon=True, name="castore-llm-loop")
                t.start()
                self._loop = loop
                self._clients = {}
                self._sems = {}
            return self._loop

    def close(self) -> None:
        """Close the sessions at exit (aiohttp warns about unclosed ones otherwise)."""
        loop, clients = self._loop, list(self._clients.values())
        if loop is None or not loop.is_running() or self._pid != os.getpid() or not clients:
            return

        async def close_all() -> None:
            for c in clients:
                await c.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=2)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure()).result()

    def client(self, llm: OpenAILLM) -> Any:
        """One pooled session per concurrency cap, limited to that many connections."""
        import aiohttp

        n = llm.max_concurrent_requests
        if n not in self._clients:
            self._clients[n] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=n, limit_per_host=n)
            )
        return self._clients[n]

    def semaphore(self, llm: OpenAILLM) -> asyncio.Semaphore:
        key = (llm.base_url, llm.model, llm.max_concurrent_requests)
        if key not in self._sems:
            self._sems[key] = asyncio.Semaphore(llm.max_concurrent_requests)
        return self._sems[key]


_LOOP = _EventLoop()
atexit.register(_LOOP.close)


class VLLMServer(OpenAILLM):
    """vLLM's OpenAI-compatible server (`vllm serve MODEL`); its `--api-key` is read
    from VLLM_API_KEY, so an OpenAI key in the environment is never sent to it."""

    base_url: str = "http://localhost:8000/v1"
    api_key_env: str = "VLLM_API_KEY"


class LlamaCppServer(OpenAILLM):
    """llama.cpp's `llama-server` (`--api-key` read from LLAMA_API_KEY)."""

    base_url: str = "http://localhost:8080/v1"
    api_key_env: str = "LLAMA_API_KEY"


class TGIServer(OpenAILLM):
    """Text Generation Inference, or a Hugging Face Inference Endpoint running it (its
    Messages API at …/v1); the token is read from HF_TOKEN."""

    base_url: str = "http://localhost:8080/v1"
    api_key_env: str = "HF_TOKEN"


class OllamaServer(OpenAILLM):
    """Ollama's OpenAI-compatible API (`ollama serve`); no key unless OLLAMA_API_KEY."""

    base_url: str = "http://localhost:11434/v1"
    api_key_env: str = "OLLAMA_API_KEY"
