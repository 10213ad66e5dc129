"""castore's exception tree. The CLI turns each into `Error: <message>` and its exit code."""

from __future__ import annotations

import logging
from typing import Any


class CastoreError(Exception):
    """Root of every error castore raises on purpose."""

    exit_code: int = 1


class InvalidObjectId(CastoreError, ValueError):
    """A string that is not 64 lowercase hex chars was about to become a path."""

    exit_code = 2


class InvalidRefName(CastoreError, ValueError):
    exit_code = 2


class AmbiguousId(CastoreError, ValueError):
    exit_code = 2


class UnknownObject(CastoreError, KeyError):
    exit_code = 1

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptObject(CastoreError):
    """An object's bytes do not hash to its id; it has been moved to quarantine/."""

    def __init__(self, oid: str, quarantined_to: str | None = None) -> None:
        self.oid = oid
        self.quarantined_to = quarantined_to
        where = f"; moved to {quarantined_to}" if quarantined_to else ""
        super().__init__(f"object {oid} is corrupt (digest mismatch){where}")


class NonCanonicalValue(CastoreError, TypeError):
    """A value cannot be written as canonical JSON (NaN, a set, a non-str key...)."""


class UnhashableParam(CastoreError, TypeError):
    """A step parameter cannot be canonicalized, so it cannot enter a fingerprint."""


class StoreError(CastoreError):
    """The store cannot be used: not writable, full, wrong layout."""


class BadObject(StoreError):
    """An intact object castore would not have written (e.g. a crafted extension footer):
    reading it fails like reading a corrupt one."""

    def __init__(self, oid: str, why: str) -> None:
        self.oid = oid
        self.why = why
        super().__init__(f"object {oid} {why}; `cas fsck --repair` quarantines it")


class StoreNotFound(StoreError):
    """A command that only reads met a folder with no store (it never creates one)."""


class DamagedRef(StoreError):
    """A ref file whose content is not a run manifest id (garbage, truncated, a path)."""

    exit_code = 1


class StoreNotWritable(StoreError):
    exit_code = 3


class StoreFull(StoreError):
    exit_code = 4


class LayoutVersionError(StoreError):
    exit_code = 5


class StoreLocked(StoreError):
    exit_code = 11


class PipelineError(CastoreError):
    """A pipeline cannot be built or run as defined."""


class ConfigError(CastoreError):
    """Bad user input: YAML, --param, target, run name."""

    exit_code = 2


class StaleCode(PipelineError):
    """The file of a function or class no longer holds the code this process loaded
    (castore.loaded): there is no source to hash for the code that would run."""


class StepFailed(PipelineError):
    """A batch raised after its retries and the step's on_error is 'fail'."""

    @classmethod
    def of(cls, step: str, error: BaseException) -> StepFailed:
        """The one line a run fails with when `error` stops step `step`."""
        msg = str(error)
        if isinstance(error, StepFailed):
            return cls(msg)
        if isinstance(error, CastoreError):
            # castore's own one-line errors: their class name tells a user nothing, and
            # most already name the step.
            return cls(f"step {step} failed: {msg.removeprefix(f'step {step}: ')}")
        return cls(f"step {step} failed: {type(error).__name__}: {msg}")

    @classmethod
    def logged(cls, step: str, error: BaseException) -> StepFailed:
        """`of`, logged as the run's error line (the run then raises it)."""
        err = cls.of(step, error)
        logging.getLogger("castore.run").error("%s", err)
        return err


class RowsFailed(CastoreError):
    """Some rows of a row-wise batch failed with on_error="fail": the batch fails, but the
    rows that succeeded (paid for) were stored as row results first, so its retry, and
    the next run, ask only for the rows that failed. `tokens`, `usd`, `seconds`: what the
    attempt spent, for the run's account."""

    def __init__(self, message: str, tokens: int = 0, usd: float = 0.0, seconds: float = 0.0):
        super().__init__(message)
        self.tokens, self.usd, self.seconds = tokens, usd, seconds

    def __reduce__(self) -> Any:  # from a process or Ray worker to the driver, whole
        return (type(self), (str(self), self.tokens, self.usd, self.seconds))


class RunInterrupted(CastoreError):
    """The run stopped on Ctrl+C/SIGTERM; its finished batches are stored."""

    exit_code = 130
    run_oid: str | None = None  # the sealed run manifest, when there is one


class RunWaiting(RunInterrupted):
    """The run stopped with every batch it could do done, and others waiting for batch
    jobs a provider is still running; `cas resume` (or running it again) collects them."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class BatchWaiting(CastoreError):
    """Raised by `process` when its rows are in a batch job that has not finished: the
    batch is neither done nor failed, and the run ends `waiting`."""

    def __init__(self, message: str, job: str = "") -> None:
        super().__init__(message)
        self.job = job

    def __reduce__(self) -> tuple[Any, ...]:  # the processes executor pickles it
        return (type(self), (str(self), self.job))


class NothingToResume(CastoreError):
    pass


class RemoteError(CastoreError):
    """A remote cannot be used: a failed transfer, entries that disagree with their
    manifests, a malformed remote object."""

    exit_code = 6


class RemoteUnavailable(RemoteError):
    """The remote cannot be reached (network, credentials, missing bucket)."""


class DistisetError(CastoreError):
    """A dataset cannot be built or exported as asked."""

    exit_code = 2


class LLMError(CastoreError):
    """A request failed after its retries (or cannot succeed: 4xx, no API key)."""


class LLMUnusable(LLMError, StepFailed):
    """Every request of a batch failed in a way every request to come would: the run
    stops (whatever on_error says) instead of failing every batch to come and keeping
    only None answers."""


class LLMUnreachable(LLMUnusable):
    """Every request failed to connect to the LLM server, each after its retries."""


class LLMRefused(LLMUnusable):
    """The server refused the request for what every request shares: HTTP 401, 403 or 404
    (the API key, its permissions, the model name or base_url's path)."""


class RequestAbandoned(LLMError):
    """A request the run gave up before its answer came: the run was stopped (a second
    Ctrl+C, or its grace period ran out). The row is asked again by the next run."""


class ProblemsFound(CastoreError):
    """A check (`cas fsck`) found problems; they were printed above."""

    exit_code = 1


def one_line(error: Any) -> str:
    """A pydantic ValidationError as one line: the first problem's location and message,
    and how many more there are (pydantic's own text spans lines and ends in a URL)."""
    errors = error.errors(include_url=False)
    if not errors:
        return str(error).splitlines()[0]
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    got = first.get("input")
    shown = repr(got) if got is not None and len(repr(got)) <= 60 else None
    value = f", got {shown}" if shown is not None and first.get("type") != "missing" else ""
    msg = "unknown parameter" if first.get("type") == "extra_forbidden" else first.get("msg")
    return f"{loc + ': ' if loc else ''}{msg or 'invalid'}{value}{more}"
