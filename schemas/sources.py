"""Where config data comes from: JSON or YAML files, dicts, and `--set key=value` overrides.

Precedence, lowest first: the schema's defaults < the file (or dict) < overrides, each
override applied in the order given. Reading never guesses: an empty file, a YAML list, a
key written twice, binary data or a suspiciously large file is an error naming the file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .errors import ConfigError, Problem

MAX_CONFIG_BYTES = 1 << 20
"""A training config is a few KB; a larger file is almost certainly the wrong file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key written twice (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is given twice")
        out[key] = value
    return out


def _parse_text(text: str, suffix: str) -> Any:
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_unique_pairs)
    return yaml.load(text, Loader=_UniqueKeyLoader)  # YAML is a superset of JSON


def read_config_file(path: str | Path) -> dict:
    """The mapping in a JSON (`.json`) or YAML (anything else) file, or ConfigError."""
    path = Path(path)
    fail = lambda msg, hint=None: ConfigError(Problem("", msg, suggestion=hint), source=str(path))  # noqa: E731
    if not path.is_file():
        raise fail("file not found" if not path.exists() else "not a regular file",
                   "check the path")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise fail(f"file is {size / 1e6:.1f} MB; a training config is a few KB",
                   f"check that this is the config (limit {MAX_CONFIG_BYTES >> 10} KiB)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 text (byte {e.start})", "give a JSON or YAML file") from e
    if not text.strip():
        raise fail("file is empty", "write the config as a JSON object or YAML mapping")
    try:
        data = _parse_text(text, path.suffix.lower())
    except (ValueError, RecursionError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise fail(f"not valid {kind}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise fail(f"the top level must be a mapping of keys, got {_kind(data)}",
                   "write the config as a JSON object or YAML mapping")
    return data


def _kind(value: object) -> str:
    return {list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`zero_optimization.stage=2` -> (["zero_optimization", "stage"], 2); values read as YAML."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(Problem("", f"override {text!r} is not of the form dotted.key=value",
                                  suggestion="e.g. --set zero_optimization.stage=2"), source="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [p.strip() for p in parts], value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """A copy of `data` with each override applied in order (later ones win)."""
    out = copy.deepcopy(dict(data))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(Problem(where, f"override {text!r} descends into a value that is not a mapping",
                                          given=child), source="--set")
            node = child
        node[keys[-1]] = value
    return out
