"""Offline batch generation: an LLM step's missing rows as one provider batch job
(OpenAI's Batch API: `/v1/files` + `/v1/batches`, and the servers that mimic it), at
about half the price of live requests, results within the completion window.

A job is named by its **job key**: blake3 of the server, the model and every request
body in order. The same rows asked again give the same key, so a job is never
submitted twice for them, by this run, a resumed one, or another run of the store. Its
record also lists a hash of each request: a batch whose rows are partly in a submitted
job (rows were added while it ran) sends only the others and takes the rest of its
answers from that job (`_answer`).

Write order, so a crash at any moment loses no job and pays none twice:

1. the job record `jobs/<key>.json` (state `uploading`), durable (fsync) before any call;
2. the input file upload; its id recorded (durable);
3. the batch create, with `metadata.castore_job = <key>`; its id recorded (durable).

A record without a batch id (a crash around the create) is settled on the next attempt
by listing the account's batches and adopting the one whose metadata names the key;
only if there is none is a new one created. A record is never deleted by castore: it is
what says the job was paid for.

While a job runs, the step's `process` raises BatchWaiting: the batch is neither done
nor failed, other batches go on, and the run ends `waiting` (exit 75). The next run
polls; a finished job's output file is downloaded and its rows are the step's answers
(row results like live ones). Rows the job failed, or that an expired or cancelled job
did not answer, fail their batch as a live failure would; the retry asks for them alone,
in a new job. The API key is never in a record, a request file or a log line.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from castore.batchapi import BatchApi, read_results, request_file
from castore.errors import BatchWaiting, LLMError, StepFailed, StoreLocked
from castore.hashing import hash_json
from castore.jobctx import PIPELINE as _PIPELINE
from castore.jobctx import REMOTE as _REMOTE
from castore.jobctx import STORE as _STORE
from castore.llms import Prices, usage_totals
from castore.store import layout as L
from castore.store.locks import FileLock

if TYPE_CHECKING:
    from castore.llms import Generation, OpenAILLM
    from castore.store import Store

log = logging.getLogger("castore.run")

LOCK_WAIT = 300.0  # seconds a batch waits for another's submission before parking
# A provider's end states of a job (anything else: it still works on it).
ENDED = {"completed", "failed", "expired", "cancelled"}


class JobRecord(BaseModel):
    """jobs/<key>.json: what castore knows of one batch job. No secret in it."""

    def cost(self) -> float | None:
        """USD, from the job's usage and the prices given; None until both are known."""
        if self.prices is None or not self.state.startswith("collected"):
            return None
        return self.prices.cost(self.prompt_tokens, self.completion_tokens)

    key: str
    step: str
    base_url: str
    model: str
    api_key_env: str
    rows: int
    state: str = "uploading"  # then submitted, a provider state, collected
    input_file_id: str | None = None
    batch_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The LLM's `prices` (USD per 1M tokens) when given: the job's cost is estimated with
    # them once its usage is known (at collection).
    prices: Prices | None = None
    missing: int | None = None  # rows without an answer, once collected
    unanswered: list[int] | None = None  # which (positions), once collected
    # Per request, in order: the first 128 bits of the blake3 of its body. A row asked
    # again in another batch (rows added while the job ran) is found here and waits for
    # this job instead of being paid for in a second one.
    requests: list[str] = Field(default_factory=list)
    pipelines: list[str] = Field(default_factory=list)  # whose runs asked for its rows
    attempt: int = 0  # the same rows asked again after a job that left some unanswered
    rows_key: str = ""  # the key of the requests (the record's key is this plus attempt)
    # The job's own input file (as the provider has it) was checked to hold these rows'
    # requests: true for a job this store submitted, false for one pulled or adopted.
    verified: bool = True
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    updated: datetime = Field(default_factory=lambda: datetime.now(UTC))


def _remote_record(remote: Any, key: str) -> JobRecord | None:
    """The remote's record of `key`; None when it is absent, malformed or filed under
    another key. Other errors (an unreachable remote) are the caller's."""
    try:
        rec = JobRecord.model_validate_json(remote.read(remote.layout.job_path(key)))
    except (FileNotFoundError, ValueError):
        return None
    return rec if rec.key == key else None


def _take(store: Store, rec: JobRecord) -> JobRecord:
    """Keep a record that came from elsewhere; it is checked against the provider
    before its job's answers are used."""
    rec.verified = False
    save(store, rec, touch=False)
    return rec


def _from_remote(store: Store, key: str) -> JobRecord | None:
    remote = _REMOTE.get("remote")
    if remote is None:
        return None
    try:
        rec = _remote_record(remote, key)
    except OSError:  # unreachable: as if absent (the run goes on locally)
        return None
    return _take(store, rec) if rec is not None else None


def _share(rec: JobRecord) -> None:
    remote = _REMOTE.get("remote")
    if remote is None or not _REMOTE.get("push"):
        return
    try:
        remote.write(remote.layout.job_path(rec.key), rec.model_dump_json(indent=1).encode())
    except OSError as e:  # the record is safe locally; `cas push` sends it later
        log.warning("batch job %s: not written to the remote (%s); cas push later", rec.key[:12], e)


def _store() -> Store:
    store = _STORE.get("store")
    if store is None:
        raise StepFailed(
            "offline batch jobs need the run's store: use the threads or processes executor"
        )
    return store


def job_key(llm: OpenAILLM, bodies: list[dict[str, Any]]) -> str:
    return hash_json({"base_url": llm.base_url.rstrip("/"), "batch": bodies})


def save(store: Store, rec: JobRecord, *, touch: bool = True) -> None:
    """Write the record atomically and make it durable before returning."""
    if touch:
        rec.updated = datetime.now(UTC)
    path = store.layout.job_path(rec.key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    store.write_file(path, rec.model_dump_json(indent=1).encode())
    for synced in (path, os.path.dirname(path)):  # the record, then its name in the folder
        fd = os.open(synced, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load(store: Store, key: str) -> JobRecord | None:
    try:
        with open(store.layout.job_path(key), "rb") as f:
            return JobRecord.model_validate_json(f.read())
    except FileNotFoundError:
        return None


def record_files(store: Store) -> Iterator[tuple[str, JobRecord | None]]:
    """Each file of jobs/ by name, with its record (None: it cannot be read)."""
    folder = store.layout.dir(L.JOBS)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                yield name, JobRecord.model_validate_json(f.read())
        except (OSError, ValueError):
            yield name, None


def records(store: Store) -> list[JobRecord]:
    """Every job record of the store, newest first (an unreadable one is skipped)."""
    out = [rec for _, rec in record_files(store) if rec is not None]
    return sorted(out, key=lambda r: r.created, reverse=True)


# -- the step's side --------------------------------------------------------------------


def generate(
    llm: OpenAILLM, step: str, conversations: list[list[dict[str, Any]]]
) -> list[Generation | BaseException]:
    """The answers to `conversations` from one batch job: submitted (or adopted) on the
    first call, collected once the provider finished it. Raises BatchWaiting meanwhile."""
    store = _store()
    bodies = [llm.chat_body(c) for c in conversations]
    key = job_key(llm, bodies)
    # One batch of the store at a time (any run, any thread) decides which of its rows
    # are in a job already and submits the others: a job another batch is submitting is
    # then recorded, with its requests, before this one looks. Polling is quick.
    lock = FileLock(store.layout.lock_path("batch-jobs"), "batch-jobs", {"step": step})
    try:
        lock.acquire(timeout=LOCK_WAIT)
    except StoreLocked as e:
        raise BatchWaiting(f"{e}; the next run polls this batch's job", job=key) from None
    try:
        results = _answer(store, llm, step, key, bodies)
    finally:
        lock.release()
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    if failed and llm.offline_failed == "live":  # the rest at once, at the live price
        for i, res in zip(failed, llm.generate([conversations[i] for i in failed]), strict=True):
            results[i] = res
    return results


def _answer(
    store: Store, llm: OpenAILLM, step: str, key: str, bodies: list[dict[str, Any]]
) -> list[Generation | BaseException]:
    """These requests' answers: from their own job when there is one (or none of them is
    in another); else the requests already in another submitted job take its answers
    (waiting while it runs) and only the rest go to a new job, submitted at once."""
    if _current(store, key)[2] is not None:
        return _generate(store, llm, step, key, bodies)
    hashes = [request_hash(b) for b in bodies]
    claimed = _claims(store, llm, hashes)
    if not claimed:
        return _generate(store, llm, step, key, bodies)
    out: list[Generation | BaseException | None] = [None] * len(bodies)
    waits: list[BatchWaiting] = []
    rest = [i for i in range(len(bodies)) if i not in claimed]
    if rest:
        sub = [bodies[i] for i in rest]
        try:
            for i, res in zip(
                rest, _generate(store, llm, step, job_key(llm, sub), sub), strict=True
            ):
                out[i] = res
        except BatchWaiting as w:
            waits.append(w)
    jobs: dict[str, tuple[JobRecord, list[tuple[int, int]]]] = {}
    for i, (rec, j) in claimed.items():
        jobs.setdefault(rec.key, (rec, []))[1].append((i, j))
    for rec, pairs in jobs.values():
        try:
            answers = _collect(store, llm, rec)
        except BatchWaiting as w:
            waits.append(w)
            continue
        for i, j in pairs:
            out[i] = answers[j]
    if waits:
        raise BatchWaiting("; ".join(map(str, waits)), job=waits[0].job)
    return [r if r is not None else LLMError("no answer") for r in out]


def request_hash(body: dict[str, Any]) -> str:
    return hash_json(body)[:32]


def _claims(store: Store, llm: OpenAILLM, hashes: list[str]) -> dict[int, tuple[JobRecord, int]]:
    """Which of these requests (by position) a submitted job of this server already
    holds, and where in it: not the ones it ended without answering. The n-th equal
    request takes the job's n-th equal one (two equal prompts are two samples)."""
    wanted = set(hashes)
    held: dict[str, list[tuple[JobRecord, int]]] = {}
    base_url = llm.base_url.rstrip("/")
    for rec in records(store):
        if rec.base_url != base_url or not wanted & set(rec.requests):
            continue
        if rec.batch_id is None and not _settle(store, llm, rec):
            continue
        skip = set(rec.unanswered or ())
        for j, h in enumerate(rec.requests):
            if h in wanted and j not in skip:
                held.setdefault(h, []).append((rec, j))
    out: dict[int, tuple[JobRecord, int]] = {}
    for i, h in enumerate(hashes):
        if held.get(h):
            out[i] = held[h].pop(0)
    return out


def _settle(store: Store, llm: OpenAILLM, rec: JobRecord) -> bool:
    """A record left without a job id (its run died around the create call; the lock
    says no live one is at it): adopt the job if the provider has one under its key.
    False when there is none: its rows are free to be asked again."""
    if rec.input_file_id is None:
        return False  # died before its upload finished: no job can exist
    adopted = BatchApi(llm).find(rec.key)
    if adopted is None:
        return False
    rec.batch_id, rec.verified, rec.state = adopted["id"], False, "submitted"
    save(store, rec)
    return True


def _collect(
    store: Store, llm: OpenAILLM, rec: JobRecord, bodies: list[dict[str, Any]] | None = None
) -> list[Generation | BaseException]:
    """The answers of a submitted job (all its requests, in order), once it ended;
    BatchWaiting while it runs. A record not from this store's own submission is first
    checked against the job's input file, as the provider has it: against `bodies` when
    these are all its requests, else against the request hashes it lists."""
    api = BatchApi(llm)
    assert rec.batch_id is not None
    _mark(rec)
    info = api.retrieve(rec.batch_id)
    if not rec.verified:
        _check_requests(api, rec, info.get("input_file_id"), bodies)
        rec.verified = True
    if not rec.state.startswith("collected"):
        _apply(rec, info)
    if rec.state not in ENDED and not rec.state.startswith("collected"):
        save(store, rec)
        some = "" if bodies is not None else ", some of them these"
        raise BatchWaiting(
            f"batch job {rec.batch_id} ({rec.rows} rows{some}) is {rec.state}", job=rec.batch_id
        )
    return _finish(store, llm, rec, read_results(api, rec, rec.rows, llm.chat_parser()))


def _finish(
    store: Store, llm: OpenAILLM, rec: JobRecord, results: list[Generation | BaseException]
) -> list[Generation | BaseException]:
    """Record what a job's answers used and left unanswered; the answers."""
    rec.tokens, rec.prompt_tokens, rec.completion_tokens = usage_totals(
        r.usage for r in results if not isinstance(r, BaseException)
    )
    rec.prices = rec.prices or llm.prices
    rec.unanswered = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    rec.missing = len(rec.unanswered)
    if not rec.state.startswith("collected"):
        rec.state = f"collected ({rec.state})"
    save(store, rec)
    return results


def _mark(rec: JobRecord) -> None:
    """Name the run's pipeline in a record it asks rows of (saved with the record)."""
    name = _PIPELINE.get("name")
    if name and name not in rec.pipelines:
        rec.pipelines.append(name)


def _current(store: Store, key: str) -> tuple[str, int, JobRecord | None]:
    """The attempt to use for these rows: the first whose job is not over, or that
    answered every row (its output is read again: nothing paid twice); after a job that
    left rows unanswered (failed, expired, cancelled), the next attempt, a new job."""
    attempt, k = 0, key
    while True:
        rec = load(store, k)
        if rec is None or rec.missing in (None, 0):
            return k, attempt, rec
        attempt += 1
        k = hash_json({"job": key, "attempt": attempt})


def _generate(
    store: Store, llm: OpenAILLM, step: str, key: str, bodies: list[dict[str, Any]]
) -> list[Generation | BaseException]:
    rows_key = key
    key, attempt, rec = _current(store, rows_key)
    rec = (
        rec
        or _from_remote(store, key)
        or JobRecord(
            key=key,
            attempt=attempt,
            rows_key=rows_key,
            step=step,
            base_url=llm.base_url.rstrip("/"),
            model=llm.model,
            api_key_env=llm.api_key_env,
            rows=len(bodies),
            prices=llm.prices,
            requests=[request_hash(b) for b in bodies],
        )
    )
    api = BatchApi(llm)
    _mark(rec)
    if rec.batch_id is None:
        if rec.state == "uploading" and rec.input_file_id is None:
            save(store, rec)  # durable before anything is sent
        adopted = api.find(key) if rec.input_file_id is not None else None
        if adopted is not None:
            rec.batch_id, rec.verified = adopted["id"], False
        else:
            if rec.input_file_id is None:
                rec.input_file_id = api.upload(request_file(bodies))
                save(store, rec)
            rec.batch_id = api.create(rec.input_file_id, key)
        rec.state = "submitted"
        save(store, rec)
        _share(rec)
    return _collect(store, llm, rec, bodies)


def _check_requests(
    api: BatchApi, rec: JobRecord, input_file_id: str | None, bodies: list[dict[str, Any]] | None
) -> None:
    """The job's input file, as the provider has it, holds exactly these requests (the
    file castore would upload for `bodies`; without them, request `row-i` at line i with
    the body whose hash the record lists at i): a record (pulled from a remote, or
    edited) naming another job must not hand its answers to these rows."""
    text = api.content(input_file_id) if input_file_id is not None else None
    if text is not None and bodies is not None and text.encode() == request_file(bodies):
        return
    if text is not None and bodies is None and _listed_hashes(text) == rec.requests:
        return
    raise StepFailed(
        f"batch job {rec.batch_id} does not hold these rows' requests (its record "
        f"jobs/{rec.key}.json names another job); remove that record and run again"
    )


def _listed_hashes(text: str) -> list[str] | None:
    """The body hashes of a request file's lines, when line i is request `row-i` (the
    id its answer comes back under) to the chat endpoint; else None."""
    out = []
    try:
        for i, line in enumerate(x for x in text.splitlines() if x.strip()):
            item = json.loads(line)
            if item["custom_id"] != f"row-{i}" or item["url"] != "/v1/chat/completions":
                return None
            out.append(request_hash(item["body"]))
    except (ValueError, KeyError, TypeError):
        return None
    return out


def refresh(store: Store, rec: JobRecord, llm: OpenAILLM) -> JobRecord:
    """The record with the provider's current state (for `cas jobs --refresh`)."""
    if rec.batch_id is not None and not rec.state.startswith("collected"):
        _apply(rec, BatchApi(llm).retrieve(rec.batch_id))
        save(store, rec)
    return rec


def _apply(rec: JobRecord, info: dict[str, Any]) -> None:
    """What the provider says of the job, into its record."""
    rec.state = info.get("status", rec.state)
    rec.counts = info.get("request_counts") or rec.counts
    rec.output_file_id = info.get("output_file_id") or rec.output_file_id
    rec.error_file_id = info.get("error_file_id") or rec.error_file_id


def cancel(store: Store, rec: JobRecord, llm: OpenAILLM) -> str:
    """Ask the provider to cancel the job; its state as it answers (`cas jobs cancel`)."""
    if rec.batch_id is None:
        raise StepFailed(f"batch job {rec.key[:12]} was never submitted")
    rec.state = str(BatchApi(llm).cancel(rec.batch_id).get("status", "cancelling"))
    save(store, rec)
    return rec.state


def _rank(rec: JobRecord) -> tuple[bool, bool, datetime]:
    """Which of two copies of a record knows more: submitted, then collected, then newer."""
    return (rec.batch_id is not None, rec.missing is not None, rec.updated)


def push_records(store: Store, remote: Any) -> int:
    """Upload the job records the remote lacks or knows less of (`cas push`), so another
    machine that pulls polls the same jobs instead of submitting its own."""
    sent = 0
    for rec in records(store):
        theirs = _remote_record(remote, rec.key)
        if theirs is None or _rank(rec) > _rank(theirs):
            remote.write(remote.layout.job_path(rec.key), rec.model_dump_json(indent=1).encode())
            sent += 1
    return sent


def pull_records(store: Store, remote: Any) -> int:
    """Download the remote's job records this store lacks or knows less of (`cas pull`).
    A record is checked against its job's input file before its answers are used."""
    taken = 0
    try:
        paths = remote.fs.find(remote.layout.dir(L.JOBS))
    except FileNotFoundError:
        return 0
    for path in paths:
        key = posixpath.basename(path).removesuffix(".json")
        try:  # a stray name, or a record filed under another key, gives None
            rec = _remote_record(remote, key)
        except OSError:
            continue
        if rec is None:
            continue
        mine = load(store, rec.key)
        if mine is None or _rank(rec) > _rank(mine):
            _take(store, rec)
            taken += 1
    return taken


def age(rec: JobRecord) -> float:
    return time.time() - rec.created.timestamp()
