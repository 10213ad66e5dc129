"""The store's config.yaml: named remotes. Credentials never go here (URLs carrying them
are refused); they come from the environment or fsspec's own configuration."""

from __future__ import annotations

import os
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from castore.errors import ConfigError, one_line
from castore.store import Store
from castore.store.layout import validate_name
from castore.yamlio import load_yaml


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    remotes: dict[str, str] = Field(default_factory=dict)


def load_config(store: Store) -> StoreConfig:
    path = store.layout.config_file
    if not os.path.exists(path):
        return StoreConfig()
    try:
        with open(path, "rb") as f:
            data = load_yaml(f.read(), str(path)) or {}
        return StoreConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path} is not a valid castore config: {one_line(e)}") from e


def save_config(store: Store, config: StoreConfig) -> None:
    text = yaml.safe_dump(config.model_dump(), sort_keys=True)
    store.write_file(store.layout.config_file, text.encode("utf-8"))


def add_remote(store: Store, name: str, url: str) -> None:
    from castore.remote_checks import check_url

    validate_name(name, "remote name")
    check_url(url)
    config = load_config(store)
    if name in config.remotes:
        raise ConfigError(f"remote {name!r} exists ({config.remotes[name]}); remove it first")
    config.remotes[name] = url
    save_config(store, config)


def remove_remote(store: Store, name: str) -> None:
    config = load_config(store)
    if config.remotes.pop(name, None) is None:
        raise ConfigError(f"no remote named {name!r}")
    save_config(store, config)


def remote_url(store: Store | None, name: str | None) -> str:
    """A remote's URL: a configured name, else a URL or path given directly; with no
    name, $CASTORE_REMOTE, else the only configured remote. No store: no names."""
    config = load_config(store) if store is not None else StoreConfig()
    if name is None:
        name = os.environ.get("CASTORE_REMOTE")
        if name is None:
            if len(config.remotes) == 1:
                return next(iter(config.remotes.values()))
            raise ConfigError(
                "no remote given: name one, set CASTORE_REMOTE, or add one with "
                "`cas remote add NAME URL`"
            )
    if name in config.remotes:
        return config.remotes[name]
    if _looks_like_url(name):
        return name
    known = ", ".join(sorted(config.remotes)) or "none"
    raise ConfigError(f"no remote named {name!r} (configured: {known})")


def _looks_like_url(value: str) -> bool:
    return "://" in value or value.startswith(("/", ".", "~"))


def is_remote_name(store: Store, value: str) -> bool:
    """A configured remote, a URL or a path (a run spec is none of these)."""
    return value in load_config(store).remotes or _looks_like_url(value)
