"""Bounded readers for every YAML and JSON file a user hands llmpress: recipes, params.yaml, llm-compressor
recipes, `--set` values, model configs, manifests.

A config file is small and plain. What is not gets one `ConfigError` naming the file (and line) before anything
reads its values:

- size: over `max_bytes` (1 MiB for YAML) is refused unread;
- encoding: UTF-8 only (a BOM is allowed); the first bad byte's offset is named;
- YAML 1.2 meanings, not 1.1's: `2:4` stays the string "2:4" (YAML 1.1 reads it as the base-60 number 124),
  `yes`/`no`/`on`/`off` stay strings (only true/false are booleans), `0o17` is octal and `017` is 17;
- duplicate keys in a mapping are refused (YAML and JSON would silently keep the last);
- aliases: a document whose aliases expand to more than `MAX_VALUES` values (a "billion laughs" document: a few
  lines that expand to gigabytes when anything walks them) or that refers to itself is refused after parsing,
  before anything is built from it; parsing is linear in the file's size;
- nesting deeper than `MAX_DEPTH` is refused (YAML and JSON alike).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from llmpress.errors import ConfigError

MAX_YAML_BYTES = 1 << 20
MAX_JSON_BYTES = 64 << 20  # model configs, manifests, checksum lists: small, but a tokenizer listing may be large
MAX_DEPTH = 64
MAX_VALUES = 200_000  # values after alias expansion; params.yaml has ~150


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars and no duplicate keys."""


# YAML 1.2 core schema resolvers instead of 1.1's: no base-60 numbers, no yes/no/on/off booleans
_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers
          if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}  # fmt: skip
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))  # fmt: skip
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16) if text.startswith("0x") else int(text, 10)  # "017" is 17, as in YAML 1.2


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping; a key written twice is refused (a merged `<<: *base` key may still be overridden)."""
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"line {line}: duplicate key {key_node.value!r} (first on line {seen[key]}); YAML "
                              "would silently keep only the last")  # fmt: skip
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _check_expansion(root: yaml.Node) -> None:
    """Values the document holds once every alias is expanded, and its depth; refused beyond the bounds."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    visiting: set[int] = set()

    def walk(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key], depths[key]
        if key in visiting:
            raise ConfigError(f"line {node.start_mark.line + 1}: an alias refers to the value that contains it")
        visiting.add(key)
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])  # fmt: skip
        size, depth = 1, 1
        for child in children:
            child_size, child_depth = walk(child)
            size, depth = size + child_size, max(depth, child_depth + 1)
            if size > MAX_VALUES:
                raise ConfigError(f"line {node.start_mark.line + 1}: the document expands to more than "
                                  f"{MAX_VALUES:,} values (YAML aliases); a config file is not that large")  # fmt: skip
            if depth > MAX_DEPTH:
                raise ConfigError(f"line {child.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        visiting.discard(key)
        sizes[key], depths[key] = size, depth
        return size, depth

    walk(root)


def _read_text(path: str | Path, max_bytes: int) -> str:
    """A file's text: refused when missing, over `max_bytes` (unread) or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    if (size := path.stat().st_size) > max_bytes:
        raise ConfigError(f"{path}: {size:,} bytes; a config file here is at most {max_bytes:,}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r})") from None


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document from `text`, within the bounds above; `source` names it in errors."""
    loader = None
    try:
        loader = _Loader(text)  # the reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """The YAML document in file `path`, within the bounds above."""
    return parse_yaml(_read_text(path, max_bytes), str(path))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r}; JSON readers would keep only the last")
        out[key] = value
    return out


def parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in file `path`: UTF-8, at most `max_bytes`, no duplicate keys."""
    return parse_json(_read_text(path, max_bytes), str(path))


def read_json_object(path: str | Path, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    data = read_json(path, max_bytes)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a JSON object, got {type(data).__name__}")
    return data
