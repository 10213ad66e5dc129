"""distilabel's import paths on castore: change `from distilabel.X import Y` to
`from castore.distilabel.X import Y` and the pipeline runs on castore's store (exact
resume, row-level reuse, dedupe).

This namespace is the compatibility surface: it keeps distilabel's names, defaults and
spellings where castore's own differ (default step names `text_generation_0`, a single
leaf called "default", `distilabel_metadata`, `max_new_tokens`). A distilabel name that
castore does not provide raises ImportError naming what to use instead; an argument
castore cannot honour is an error, never silently ignored. docs/migrating.md lists every
difference that remains.
"""

import warnings

from castore._version import __version__

# distilabel's tasks declare `inputs: StepColumns = [...]` in the class body, which
# pydantic makes a field over the base class's attribute, as distilabel means it.
warnings.filterwarnings(
    "ignore", r'Field name "(inputs|outputs)" in "[^"]+" shadows an attribute', UserWarning
)

__all__ = ["__version__"]
