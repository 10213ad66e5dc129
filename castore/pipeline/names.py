"""The lists of names a step declares (its columns, code packages, environment
variables, files), checked once where they are given, in one line that says what to
write."""

from __future__ import annotations

from typing import Any

from castore.errors import PipelineError

# Class attributes (and @step arguments) that are lists of names: a string there would
# be read letter by letter (ignore_env="DEBUG" ignoring variables D, E, B, U, G).
NAME_LISTS = ("inputs", "outputs", "code_packages", "ignore_env", "code_files", "ignore_files")


def names_list(what: str, value: Any) -> list[str]:
    """`value` as a list of names, or a one-line PipelineError saying what to write."""
    if value is None:
        return []
    if isinstance(value, str):
        raise PipelineError(f"{what} must be a list of names: write [{value!r}], not {value!r}")
    if not isinstance(value, (list, tuple)):
        raise PipelineError(f"{what} must be a list of names, not {value!r}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise PipelineError(f"{what} must hold names (strings), not {bad[0]!r}")
    return list(value)


def step_columns(what: str, value: Any) -> list[str] | dict[str, bool]:
    """A step's `inputs` / `outputs` as distilabel gives them too: a list of names, or
    {name: required} (an optional input is read when a batch has it)."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) and isinstance(v, bool) for k, v in value.items()):
            raise PipelineError(f"{what} must map column names to True / False, not {value!r}")
        return dict(value)
    return names_list(what, value)
