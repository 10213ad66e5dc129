"""A provider's Batch API as castore uses it (OpenAI's `/v1/files` and `/v1/batches`, and
the servers that mimic it): the request file of a job, the answers in its output and
error files, and the calls, on the LLM client's event loop. The API key is sent in a
header only, read from the environment at each call."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from castore.errors import LLMError

if TYPE_CHECKING:
    from castore.batchjobs import JobRecord
    from castore.llms import Generation, OpenAILLM


def request_file(bodies: list[dict[str, Any]]) -> bytes:
    lines = (
        json.dumps(
            {"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b},
            ensure_ascii=False,
        )
        for i, b in enumerate(bodies)
    )
    return ("\n".join(lines) + "\n").encode()


def read_results(
    api: BatchApi, rec: JobRecord, n: int, parse: Any
) -> list[Generation | BaseException]:
    """Per request, in order: its answer (read as a live answer is: a schema checked),
    or why the job has none for it."""
    from castore.llms import Unusable

    missing = f"batch job {rec.batch_id} ended {rec.state} without an answer for this row"
    out: list[Generation | BaseException] = [LLMError(missing) for _ in range(n)]
    for file_id in (rec.output_file_id, rec.error_file_id):
        if not file_id:
            continue
        for line in api.content(file_id).splitlines():
            try:
                item = json.loads(line)
                i = int(str(item["custom_id"]).removeprefix("row-"))
            except (ValueError, KeyError, TypeError):
                continue
            if not 0 <= i < n:
                continue
            response = item.get("response") or {}
            if response.get("status_code") == 200:
                try:
                    gen = parse(json.dumps(response.get("body")))
                except Unusable as e:
                    out[i] = LLMError(f"the batch job's answer: {e}")
                    continue
                out[i] = gen if gen is not None else LLMError("malformed answer in the job output")
            else:
                error = item.get("error") or response.get("body") or {}
                out[i] = LLMError(f"the batch job failed this row: {json.dumps(error)[:300]}")
    return out


class BatchApi:
    """The provider's files and batches endpoints, on the client's event loop."""

    def __init__(self, llm: OpenAILLM) -> None:
        self.llm = llm
        self.base = llm.base_url.rstrip("/")

    def _headers(self) -> dict[str, str]:
        key = self.llm.key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        from castore.llms import _LOOP

        async def go() -> Any:
            import aiohttp

            client = _LOOP.client(self.llm)
            timeout = aiohttp.ClientTimeout(total=self.llm.timeout)
            last = ""
            for attempt in range(self.llm.max_retries + 1):
                try:
                    async with client.request(
                        method, self.base + path, headers=self._headers(), timeout=timeout, **kw
                    ) as resp:
                        text = await resp.text()
                        if resp.status == 200:
                            return text
                        last = f"HTTP {resp.status}: {text[:200]}"
                        if resp.status < 500 and resp.status != 429:
                            break
                except (TimeoutError, aiohttp.ClientError) as e:
                    last = f"{type(e).__name__}: {e}"
                if attempt < self.llm.max_retries:
                    await asyncio.sleep(min(self.llm.max_backoff, self.llm.backoff * 2**attempt))
            raise LLMError(f"{method} {path}: {last}")

        return _LOOP.run(go())

    def upload(self, data: bytes) -> str:
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field(
            "file", data, filename="castore-batch.jsonl", content_type="application/jsonl"
        )
        return str(json.loads(self._call("POST", "/files", data=form))["id"])

    def create(self, input_file_id: str, key: str) -> str:
        body = {
            "input_file_id": input_file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"castore_job": key},
        }
        return str(json.loads(self._call("POST", "/batches", json=body))["id"])

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self._call("GET", f"/batches/{batch_id}"))
        return out

    def find(self, key: str) -> dict[str, Any] | None:
        """The account's batch whose metadata names `key` (created, then the crash came
        before its id was recorded), newest first, paging through the list."""
        after: str | None = None
        for _ in range(100):  # 100 pages of 100: far more than a day of jobs
            query = "?limit=100" + (f"&after={after}" if after else "")
            page = json.loads(self._call("GET", "/batches" + query))
            for b in page.get("data") or []:
                if (b.get("metadata") or {}).get("castore_job") == key:
                    return dict(b)
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]
        return None

    def content(self, file_id: str) -> str:
        return str(self._call("GET", f"/files/{file_id}/content"))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self._call("POST", f"/batches/{batch_id}/cancel"))
        return out
