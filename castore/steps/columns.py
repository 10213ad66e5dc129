"""Column and row operations for cleaning and curating data."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, Literal

from pydantic import Field

from castore.errors import PipelineError
from castore.fingerprint import code_parts, code_version
from castore.pipeline.step import GlobalStep, Step, StepInput, runtime_field


class KeepColumns(Step):
    """Keep only `columns`, in that order."""

    columns: list[str]

    def required_columns(self) -> list[str]:
        return list(self.columns)

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        return [{c: row.get(c) for c in self.columns} for row in inputs]

    def columns_after(self, available: set[str] | None) -> set[str]:
        if available is not None:
            missing = [c for c in self.columns if c not in available]
            if missing:
                raise PipelineError(f"step {self.name}: no predecessor produces {missing[0]!r}")
        return set(self.columns)


class RenameColumns(Step):
    """Rename columns: `mapping` old name -> new name."""

    mapping: dict[str, str]

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        targets = list(self.mapping.values())
        twice = next((t for t in targets if targets.count(t) > 1), None)
        if twice is not None:
            raise PipelineError(f"step {self.name}: mapping renames two columns to {twice!r}")

    def required_columns(self) -> list[str]:
        return list(self.mapping)

    def _overwritten(self, columns: Iterable[str]) -> None:
        """A new name that is a column kept as it is would silently replace its values."""
        kept = set(columns) - set(self.mapping)
        for old, new in self.mapping.items():
            if new in kept:
                raise PipelineError(
                    f"step {self.name}: renaming {old!r} to {new!r} would overwrite column "
                    f"{new!r}; drop or rename {new!r} first"
                )

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        if inputs:
            self._overwritten(inputs[0])
        return [{self.mapping.get(k, k): v for k, v in row.items()} for row in inputs]

    def columns_after(self, available: set[str] | None) -> set[str] | None:
        if available is None:
            return None
        self._overwritten(available)
        return {self.mapping.get(c, c) for c in available}


class ExpandColumns(Step):
    """One row per element of list columns (zipped when several are named)."""

    columns: list[str]

    def required_columns(self) -> list[str]:
        return list(self.columns)

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        out = []
        for row in inputs:
            lists = [row.get(c) or [] for c in self.columns]
            for values in zip(*lists, strict=False):
                out.append({**row, **dict(zip(self.columns, values, strict=True))})
        return out


class MergeColumns(Step):
    """`columns` become one list column, `output_column` (default `merged_column`): a
    list value adds its items, any other value itself, in the order of `columns`; the
    merged columns are removed (as distilabel's MergeColumns does)."""

    columns: list[str] = Field(description="Columns to merge, in order.")
    output_column: str | None = Field(None, description="Name of the list column.")

    def required_columns(self) -> list[str]:
        return list(self.columns)

    @property
    def outputs(self) -> list[str]:  # type: ignore[override]
        return [self.output_column or "merged_column"]

    def process(self, inputs: StepInput) -> list[dict[str, Any]]:
        name, merged = self.outputs[0], set(self.columns)
        out = []
        for row in inputs:
            values: list[Any] = []
            for c in self.columns:
                v = row[c]
                values += v if isinstance(v, list) else [v]
            out.append({**{k: v for k, v in row.items() if k not in merged}, name: values})
        return out

    def columns_after(self, available: set[str] | None) -> set[str] | None:
        if available is None:
            return None
        return (available - set(self.columns)) | set(self.outputs)


class CombineOutputs(Step):
    """Merge several predecessors row by row (`[a, b] >> combine`)."""

    def process(self, inputs: StepInput) -> StepInput:
        return inputs


class GroupColumns(Step):
    """`[gen_a, gen_b] >> GroupColumns(columns=["generation"])`: each of `columns`, which
    every predecessor writes, becomes one list per row, a value per predecessor in the
    order they were connected, named `grouped_<column>` (or `output_columns`). The other
    columns merge by name as in any fan-in."""

    columns: list[str] = Field(description="Columns to group (each predecessor has them).")
    output_columns: list[str] | None = Field(
        None, description="Names of the grouped columns; default grouped_<column>."
    )

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if self.output_columns is not None and len(self.output_columns) != len(self.columns):
            raise PipelineError(
                f"step {self.name}: output_columns needs one name per column of {self.columns}"
            )

    def _names(self) -> dict[str, str]:
        out = self.output_columns or [f"grouped_{c}" for c in self.columns]
        return dict(zip(self.columns, out, strict=True))

    def grouped_columns(self) -> list[str]:
        return list(self.columns)

    def required_columns(self) -> list[str]:
        return list(self.columns)

    def process(self, inputs: StepInput) -> StepInput:
        names = self._names()
        return [{names.get(k, k): v for k, v in row.items()} for row in inputs]

    @property
    def outputs(self) -> list[str]:  # type: ignore[override]
        """The grouped columns' names (output_mappings apply to them as to any step's)."""
        return list(self._names().values())

    def columns_after(self, available: set[str] | None) -> set[str] | None:
        if available is None:
            return None
        return (available - set(self.columns)) | set(self.outputs)


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "in": lambda a, b: a in b,
    "not_in": lambda a, b: a not in b,
    "contains": lambda a, b: a is not None and b in a,
    "min_length": lambda a, b: a is not None and len(a) >= b,
    "max_length": lambda a, b: a is not None and len(a) <= b,
    "is_null": lambda a, _b: a is None,
    "not_null": lambda a, _b: a is not None,
}


def _value_problem(op: str, value: Any) -> str | None:
    if op in ("min_length", "max_length"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else f"value must be a length (an integer >= 0), got {value!r}"
    if op in ("in", "not_in") and not isinstance(value, list | tuple | set | frozenset):
        return f"value must be a list of the values to test against, got {value!r}"
    if op in ("is_null", "not_null") and value is not None:
        return f"takes no value (got {value!r}); remove it"
    if op == "contains" and value is None:
        return "value must be what the column should contain"
    return None


class FilterRows(Step):
    """Keep rows where `column op value` holds, or where `predicate(row)` is true.

    A predicate's code (its normalized AST) enters the fingerprint like `process` does."""

    column: str | None = None
    op: Literal[
        "==",
        "!=",
        "<",
        "<=",
        ">",
        ">=",
        "in",
        "not_in",
        "contains",
        "min_length",
        "max_length",
        "is_null",
        "not_null",
    ] = "=="
    value: Any = None
    predicate: Callable[[dict[str, Any]], bool] | None = runtime_field(None, exclude=True)

    def model_post_init(self, context: Any, /) -> None:
        if (self.column is None) == (self.predicate is None):
            raise PipelineError("FilterRows needs either column/op/value or predicate")
        problem = _value_problem(self.op, self.value) if self.predicate is None else None
        if self.predicate is not None and (self.op != "==" or self.value is not None):
            problem = "op and value are not used with a predicate; give one or the other"
        if problem:  # a filter that fails on its first row, or ignores what it was given
            raise PipelineError(f"FilterRows(column={self.column!r}, op={self.op!r}): {problem}")
        super().model_post_init(context)

    def required_columns(self) -> list[str]:
        return [self.column] if self.column is not None else []

    def extra_identity(self) -> Any:
        if self.predicate is None:
            return None
        # Its code and what it reaches (a threshold constant, a helper): the plain
        # digest of its own code when it reaches nothing, as before that was followed.
        root, parts = code_parts(self.predicate)
        return {"predicate": f"{self.predicate.__qualname__}@{code_version(root, parts)}"}

    def process(self, inputs: StepInput) -> StepInput:
        if self.predicate is not None:
            return [row for row in inputs if self.predicate(row)]
        test = _OPS[self.op]
        return [row for row in inputs if test(row.get(self.column), self.value)]  # type: ignore[arg-type]


class DeduplicateRows(GlobalStep):
    """Exact dedupe on `columns` (all columns when empty); the first occurrence stays."""

    columns: list[str] = Field(default_factory=list)

    def required_columns(self) -> list[str]:
        return list(self.columns)

    def process(self, inputs: StepInput) -> StepInput:
        import json

        seen: set[str] = set()
        out = []
        for row in inputs:
            key_src = {c: row.get(c) for c in self.columns} if self.columns else row
            key = json.dumps(key_src, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                out.append(row)
        return out
