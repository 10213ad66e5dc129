"""Prompt templates: Jinja2, as distilabel's (`{{ instruction }}`), rendered in a sandbox
with StrictUndefined, so a template never reaches a model with a variable left in it.

Three ways a template could send wrong prompts without an error are refused instead: a
variable the step's input lacks (at build time, naming the column), a variable missing
or null in a row (at render time), and a str.format field (`{instruction}`), which
Jinja2 would send literally.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from castore.errors import PipelineError

if TYPE_CHECKING:
    import jinja2

# `{name}` that is not part of `{{ ... }}`: str.format syntax, which Jinja2 keeps as text.
_FORMAT_FIELD = re.compile(r"(?<!\{)\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}(?!\})")


@functools.lru_cache(maxsize=256)
def _compiled(template: str) -> tuple[jinja2.Template, tuple[str, ...]]:
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import SandboxedEnvironment

    fields = _FORMAT_FIELD.findall(template)
    if fields:
        name = fields[0]
        raise PipelineError(
            f"template field {{{name}}} is str.format syntax, which Jinja2 templates send "
            f"as written: write {{{{ {name} }}}} (for literal braces, {{{{ '{{{name}}}' }}}})"
        )
    env = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    try:
        parsed = env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        msg = f"template is not valid Jinja2: {e.message} (line {e.lineno})"
        raise PipelineError(msg) from None
    # Sorted: the variables are a row-wise step's key columns, in a stable order.
    return env.from_string(parsed), tuple(sorted(meta.find_undeclared_variables(parsed)))


def template_columns(template: str) -> list[str]:
    """The row columns `template` reads; PipelineError for a template that cannot be
    rendered right (bad syntax, str.format fields)."""
    return list(_compiled(template)[1])


def render(template: str, row: dict[str, Any]) -> str:
    """`template` with the row's values; PipelineError naming a variable the row lacks.

    A null cell counts as missing (a row-oriented source's missing key becomes a null in
    Arrow): rendered, it would send the text "None" to a model."""
    import jinja2

    compiled, _ = _compiled(template)
    try:
        return compiled.render({k: v for k, v in row.items() if v is not None})
    except jinja2.UndefinedError as e:
        raise PipelineError(
            f"template: {e.message} in a row (missing or null); guard optional values "
            "with {% if name is defined %} or {{ name | default('...') }}"
        ) from None
    except jinja2.TemplateError as e:
        raise PipelineError(f"template: {e}") from None
