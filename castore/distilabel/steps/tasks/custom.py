"""distilabel's custom tasks on castore: a `Task` subclass with `inputs` / `outputs` and
`format_input` / `format_output`, or a function under `@task` whose docstring holds the
prompts. Each runs as castore's LLM tasks do: row-wise, one request per row, an answer
reused by the values of the task's inputs in any later run or pipeline."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, ClassVar

import yaml
from pydantic import model_validator

from castore.distilabel.steps.tasks._base import _Compat
from castore.errors import PipelineError, StepFailed
from castore.pipeline.names import step_columns
from castore.steps.llm import AnswerUnusable

_HOOKS = ("format_input", "format_output")


def _columns(what: str, value: Any, add: tuple[str, ...] = ()) -> Any:
    """distilabel's StepColumns as `step_columns` checks them (None refused: a property
    that forgot to return); with `add` (the outputs), a list with those names too."""
    if value is None:
        raise PipelineError(f"{what} must be a list of column names, not None")
    cols = step_columns(what, value)
    if not add:
        return cols
    names = list(cols)
    return [*names, *(a for a in add if a not in names)]


def _wrapped(cls: type, attr: str, add: tuple[str, ...]) -> None:
    """Make the subclass's `inputs` / `outputs` property give castore's list."""
    prop = inspect.getattr_static(cls, attr, None)
    if not isinstance(prop, property) or prop.fget is None or hasattr(prop.fget, "_declared"):
        return
    fget = prop.fget

    def get(self: Any) -> Any:
        return _columns(f"{type(self).__name__}.{attr}", fget(self), add)

    get._declared = fget  # type: ignore[attr-defined]
    setattr(cls, attr, property(get))


class Task(_Compat):
    """distilabel's `Task`: subclass it with `inputs` and `outputs` (properties giving a
    list of columns, or {column: required}), `format_input(input)` returning the
    conversation (a list of {"role", "content"} dicts) and `format_output(output,
    input)` returning a dict of the output columns. `model_name` is added to the outputs
    as distilabel adds it.

    Where castore differs: the task is row-wise (its answers are reused by the values of
    its inputs, so `format_input` sees those columns alone, an optional one when the
    input has it); a `format_output` that raises fails that row (its answer is kept in
    the metadata column, and a retry or the next run asks again) instead of caching
    None outputs; a declared output `format_output` leaves out is None, and a column it
    returns beyond the outputs fails the batch."""

    any_answer_columns: ClassVar[bool] = True
    use_default_structured_output: bool = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _wrapped(cls, "inputs", ())
        _wrapped(cls, "outputs", ("model_name",))

    @model_validator(mode="after")
    def _defined(self) -> Task:
        missing = [h for h in _HOOKS if getattr(type(self), h) is getattr(Task, h)]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: a Task subclass defines inputs, outputs, "
                f"format_input and format_output (missing: {', '.join(missing)})"
            )
        if self.use_default_structured_output:
            raise ValueError(
                "use_default_structured_output=True: castore does not choose a structured "
                "output for a task; pass llm=OpenAILLM(..., structured_output={'schema': ...})"
            )
        if "outputs" in type(self).model_fields:  # `outputs: StepColumns = [...]` as a field
            outputs = _columns(f"{type(self).__name__}.outputs", self.outputs, ("model_name",))
            object.__setattr__(self, "outputs", outputs)  # not validated again
        return self

    def format_input(self, input: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def format_output(self, output: str | None, input: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def conversation(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        messages = self.format_input(row)
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
            for m in messages
        ):
            shown = repr(messages)
            raise StepFailed(
                f"step {self.name}: format_input must return a list of {{'role', 'content'}} "
                f"dicts (distilabel's ChatType), not {shown[:80]}"
                + ("..." if len(shown) > 80 else "")
            )
        return messages

    def parse(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        cols = self.answer_columns()
        if text is None:  # the request failed: the row fails, whatever format_output says
            return dict.fromkeys(cols)
        try:
            got = self.format_output(text, _Input(row))
        except _Undeclared as e:  # a column the task does not declare: the check names it
            raise KeyError(*e.args) from None
        except Exception as e:  # a KeyError too: a key the answer lacks
            raise AnswerUnusable(f"format_output raised {type(e).__name__}: {e}") from e
        if not isinstance(got, dict):
            raise StepFailed(
                f"step {self.name}: format_output must return a dict of its output columns "
                f"{cols}, not {type(got).__name__}"
            )
        return {**dict.fromkeys(cols), **got}


class _Undeclared(KeyError):
    """A column `format_output` read that its input row does not have."""


class _Input(dict[str, Any]):
    """The row `format_output` gets: a missing column raises _Undeclared, told apart from
    the KeyError of an answer that lacks a key it looks up."""

    def __missing__(self, key: str) -> Any:
        raise _Undeclared(key)


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def task(
    inputs: list[str] | dict[str, bool] | None = None,
    outputs: list[str] | dict[str, bool] | None = None,
) -> Callable[[Callable[..., dict[str, Any]]], type[Task]]:
    """distilabel's `@task`: a Task from a `format_output(output, input)` function whose
    docstring holds, between two `---` lines, YAML with `system_prompt` and
    `user_message_template` (Python `{column}` placeholders, each one of `inputs`). The
    two prompts are fields of the task, so editing either asks the LLM again."""
    in_cols = _columns("@task inputs", inputs or [])
    out_cols = _columns("@task outputs", outputs or [])

    def decorate(func: Callable[..., dict[str, Any]]) -> type[Task]:
        system_prompt, template = _prompts(func)
        for what, text in (("system_prompt", system_prompt), ("user_message_template", template)):
            unknown = sorted(set(_PLACEHOLDER.findall(text)) - set(in_cols))
            if unknown:
                raise PipelineError(
                    f"@task {func.__name__}: its {what} uses {{{unknown[0]}}}, which is not "
                    f"one of its inputs {in_cols}: add it to inputs or escape it as {{{{ }}}}"
                )

        def format_input(self: Any, input: dict[str, Any]) -> list[dict[str, Any]]:
            return [
                {"role": "system", "content": self.system_prompt.format(**input)},
                {"role": "user", "content": self.user_message_template.format(**input)},
            ]

        def format_output(self: Any, output: str | None, input: Any = None) -> Any:
            return func(output, input)

        namespace: dict[str, Any] = {
            "__module__": func.__module__,
            "__qualname__": func.__qualname__,
            "__doc__": func.__doc__,
            "__annotations__": {"system_prompt": str, "user_message_template": str},
            "system_prompt": system_prompt,
            "user_message_template": template,
            "inputs": property(lambda self: in_cols),
            "outputs": property(lambda self: out_cols),
            "format_input": format_input,
            "format_output": format_output,
            # Its code version is the function's (as @step's): the class is made here.
            "_func": staticmethod(func),
            "_code_target": lambda self: func,
        }
        return type(func.__name__, (Task,), namespace)

    return decorate


def _prompts(func: Callable[..., Any]) -> tuple[str, str]:
    doc = inspect.getdoc(func) or ""
    parts = doc.split("---")
    where = f"@task {getattr(func, '__name__', func)}"
    if len(parts) != 3:
        raise PipelineError(
            f"{where}: its docstring must hold YAML between two '---' lines, with "
            "system_prompt and user_message_template"
        )
    try:
        spec = yaml.safe_load(parts[1])
    except yaml.YAMLError as e:
        raise PipelineError(f"{where}: the YAML in its docstring does not parse: {e}") from None
    keys = ("system_prompt", "user_message_template")
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in keys):
        raise PipelineError(
            f"{where}: the YAML in its docstring needs system_prompt and user_message_template "
            "(text each)"
        )
    extra = sorted(set(spec) - set(keys), key=str)
    if extra:  # read by nobody: a typo, or a setting that belongs elsewhere
        raise PipelineError(
            f"{where}: its docstring's YAML has {extra[0]!r}, which @task does not read "
            "(only system_prompt and user_message_template)"
        )
    return spec["system_prompt"].strip(), spec["user_message_template"].strip()
