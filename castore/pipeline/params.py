"""Run parameters: nested merging into step fields (distilabel's nested runtime
parameters) and redaction of secrets before a run records them."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from castore.errors import ConfigError
from castore.pipeline.step import REDACTED, is_secret

if TYPE_CHECKING:
    from castore.pipeline.pipeline import Pipeline


# Keys redacted wherever they appear in parameters, declared secret or not: a key passed
# as `--param "gen.llm={api_key: ...}"` must not reach a run manifest. Whole names only
# (with a prefix like `hf_`): `max_tokens` or `author` are parameters that a resume must
# get back, not secrets.
_SECRET_KEY = re.compile(
    r"^(.*[_-])?(api[_-]?key|(access|auth|bearer)?[_-]?token|secret([_-]?key)?|"
    r"passw(or)?d|credentials?|auth(orization)?)$",
    re.I,
)


def merged_model(model: BaseModel, changes: dict[str, Any], where: str) -> BaseModel:
    """`model` with some fields changed, nested models merged the same way (distilabel's
    nested runtime parameters: {"llm": {"generation_kwargs": {...}}} keeps the model)."""
    fields = type(model).model_fields
    values = {f: getattr(model, f) for f in fields}
    for key, value in changes.items():
        if key not in fields:
            raise ConfigError(f"{where} has no parameter {key!r}; it has {', '.join(fields)}")
        if isinstance(values[key], BaseModel) and isinstance(value, dict):
            value = merged_model(values[key], value, f"{where}.{key}")
        values[key] = value
    return type(model).model_validate(values)


def redact_parameters(
    pipeline: Pipeline, parameters: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Parameters as recorded in a run manifest: every secret field (SecretStr, also
    inside nested models such as an LLM client) and every secret-looking key replaced by
    REDACTED, however the value was given (API, --param, pipeline.yaml)."""
    out: dict[str, dict[str, Any]] = {}
    for sname, fields in parameters.items():
        step = pipeline.steps.get(sname)
        out[sname] = _redact(fields, type(step) if step is not None else None)
    return out


def _redact(value: Any, model: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(value, dict):
        fields = (
            model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        )
        out = {}
        for k, v in value.items():
            f = fields.get(k)
            if _SECRET_KEY.search(str(k)) or (f is not None and is_secret(f.annotation)):
                out[k] = REDACTED if v is not None else None
            else:
                out[k] = _redact(v, _model_of(f.annotation) if f is not None else None)
        return out
    if isinstance(value, list):
        return [_redact(v, None) for v in value]
    return value


def _model_of(annotation: Any) -> Any:
    from pydantic import BaseModel

    for a in (annotation, *(getattr(annotation, "__args__", ()) or ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def strip_redacted(value: Any) -> Any:
    """`value` without the entries that were redacted when it was recorded."""
    if isinstance(value, dict):
        return {k: strip_redacted(v) for k, v in value.items() if v != REDACTED}
    return value
