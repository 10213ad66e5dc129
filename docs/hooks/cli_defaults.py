"""mkdocs hook: the CLI reference shows "none" where click 8.3+ has no default (its
UNSET sentinel, which mkdocs-click prints as `Sentinel.UNSET`)."""

from __future__ import annotations

from typing import Any


def on_page_content(html: str, **_kwargs: Any) -> str:
    return html.replace("<code>Sentinel.UNSET</code>", "none")
