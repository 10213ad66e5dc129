"""The one YAML reader: `yaml.safe_load` semantics with limits on size and on what aliases
expand to, so a hostile pipeline.yaml, config.yaml or `--param` fails in milliseconds
instead of hanging (a "billion laughs" document is a few hundred bytes)."""

from __future__ import annotations

from typing import Any

import yaml

from castore.errors import ConfigError

MAX_BYTES = 64 << 20


class YamlSyntaxError(ConfigError):
    """The text is not YAML at all (as opposed to YAML over the limits)."""


# Nodes after expanding every alias; a 20k-row inline dataset is ~100k nodes.
MAX_NODES = 5_000_000


def _expanded_size(root: yaml.Node, limit: int, what: str) -> int:
    """Nodes the document has once every alias is expanded; linear in the document size
    because a shared node's size is computed once."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children: list[yaml.Node] = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else list(node.value)
        )
        if children_done:
            total = 1 + sum(sizes.get(id(c), 0) for c in children)
            if total > limit:
                raise ConfigError(
                    f"{what}: aliases expand to more than {limit:,} nodes; refusing to load it"
                )
            sizes[id(node)] = total
            continue
        if id(node) in visiting:
            raise ConfigError(f"{what}: an alias refers to its own anchor (a cycle)")
        visiting.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str | bytes, what: str, *, max_bytes: int = MAX_BYTES) -> Any:
    """Parse one YAML document like `yaml.safe_load`, or raise ConfigError in one line."""
    if len(text) > max_bytes:
        raise ConfigError(f"{what} is larger than {max_bytes:,} bytes; refusing to load it")
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loader = loader_cls(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, MAX_NODES, what)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise YamlSyntaxError(
            f"malformed YAML in {what}{where}: {getattr(e, 'problem', e)}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply to load") from None
    finally:
        loader.dispose()
