"""The configuration schema: the one place where every default and every choice list is written.

`unet_pipeline/schemas/config.schema.yaml` is package data, so an installed
wheel validates configs too. It is read on first use, never at import time:
importing a module costs no file read and no YAML parse. Code that needs a
default or a list of choices asks here (`default`, `choices`); nothing else
in the package spells them out again. config/README.md is generated from the
same file (`markdown_table`, checked by a test).
"""
from __future__ import annotations

import copy
import functools
from importlib import resources

import yaml

SCHEMA_FILE = resources.files("unet_pipeline") / "schemas" / "config.schema.yaml"


@functools.cache
def _loaded() -> dict:
    return yaml.safe_load(SCHEMA_FILE.read_text())


def schema() -> dict:
    """The whole schema (a copy: callers may not change the cached one)."""
    return copy.deepcopy(_loaded())


def _node(path: str) -> dict:
    """The schema of the key at dotted `path`, e.g. "predict.dtype" or "train.augment"."""
    node = _loaded()
    for part in path.split("."):
        if part == "datasets.*":
            node = node["properties"]["datasets"]["additionalProperties"]
            continue
        props = node.get("properties")
        if props is None or part not in props:
            raise KeyError(f"the config schema has no key {path!r}")
        node = props[part]
        if "$ref" in node:
            node = {**_resolve(node["$ref"]), **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _resolve(ref: str) -> dict:
    node = _loaded()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def dataset_key(key: str) -> dict:
    """The schema of one key of a dataset entry (datasets.<name>.<key>)."""
    return _loaded()["properties"]["datasets"]["additionalProperties"]["properties"][key]


def synthetic_defaults() -> dict:
    """The defaults of a synthetic stack's spec (`synthetic.<name>`)."""
    props = _loaded()["$defs"]["synthetic_stack"]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if "default" in v}


def default(path: str):
    """The default of the key at dotted `path` (a copy), e.g. default("predict.tile_size")."""
    node = _node(path)
    if "default" not in node:
        raise KeyError(f"the config schema gives {path!r} no default")
    return copy.deepcopy(node["default"])


def field(path: str):
    """A dataclass field whose default is the schema's for `path`, read when an instance is made (not at import)."""
    import dataclasses

    return dataclasses.field(default_factory=lambda: default(path))


def section_defaults(section: str) -> dict:
    """Every default of one section (nested objects included), as a filled config would hold them."""
    values: dict = {}
    fill_defaults({"properties": {section: _node(section)}}, values)
    return values[section]


def choices(path: str) -> tuple:
    """The allowed values of an enumerated key, e.g. choices("predict.dtype")."""
    node = _node(path) if not path.startswith("datasets.*.") else dataset_key(path.split(".")[-1])
    if "enum" in node:
        return tuple(node["enum"])
    for option in node.get("oneOf", []):
        if "enum" in option:
            return tuple(option["enum"])
    raise KeyError(f"the config schema gives {path!r} no list of choices")


def fill_defaults(schema_node: dict, data: dict) -> None:
    """Fill missing keys of `data` with the defaults of `schema_node`, recursing into objects."""
    for key, sub in schema_node.get("properties", {}).items():
        if "$ref" in sub:
            sub = {**_resolve(sub["$ref"]), **{k: v for k, v in sub.items() if k != "$ref"}}
        if "default" in sub and key not in data:
            data[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and "properties" in sub:
            data.setdefault(key, {})
            if isinstance(data[key], dict):
                fill_defaults(sub, data[key])


# --------------------------------------------------------------------------- documentation
def _format_default(node: dict) -> str:
    if "default" not in node:
        return "required" if node.get("x-required") else "none"
    value = node["default"]
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _rows(node: dict, prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for key, sub in node.get("properties", {}).items():
        if "$ref" in sub:
            sub = {**_resolve(sub["$ref"]), **{k: v for k, v in sub.items() if k != "$ref"}}
        path = f"{prefix}{key}"
        if sub.get("deprecated"):
            continue
        if sub.get("type") == "object" and "properties" in sub and "default" not in sub:
            rows += _rows(sub, f"{path}.")
            continue
        if sub.get("type") == "object" and "additionalProperties" in sub and "properties" not in sub:
            entry = sub["additionalProperties"]
            if "$ref" in entry:
                entry = _resolve(entry["$ref"])
            rows.append((f"`{path}`", "", sub.get("description", "")))
            rows += _rows(entry, f"{path}.<name>.")
            continue
        rows.append((f"`{path}`", _format_default(sub), sub.get("description", "")))
    return rows


def markdown_table() -> str:
    """config/README.md's table of keys: one row per key, its default and its description."""
    required = set(_loaded().get("required", []))
    root = copy.deepcopy(_loaded())
    for key in required:
        root["properties"][key]["x-required"] = True
    dataset = root["properties"]["datasets"]["additionalProperties"]
    for key in dataset.get("required", []):
        dataset["properties"][key]["x-required"] = True
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| {k} | {d} | {m} |" for k, d, m in _rows(root, "")]
    return "\n".join(lines) + "\n"


def deprecated_keys() -> dict[str, str]:
    """Old dotted key -> its replacement, from the schema's `deprecated: <new key>` entries."""
    found: dict[str, str] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, sub in node.get("properties", {}).items():
            if sub.get("deprecated"):
                found[f"{prefix}{key}"] = sub["deprecated"]
            elif sub.get("type") == "object" and "properties" in sub:
                walk(sub, f"{prefix}{key}.")

    walk(_loaded(), "")
    return found


BEGIN, END = "<!-- generated from the schema: begin -->\n", "<!-- generated from the schema: end -->"


def update_readme(path: str) -> None:
    """Rewrite the table of keys in `path` (config/README.md) from the schema, between its two markers."""
    from pathlib import Path

    text = Path(path).read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no '{BEGIN.strip()}' ... '{END}' markers to write the table between")
    head, rest = text.split(BEGIN, 1)
    Path(path).write_text(head + BEGIN + markdown_table() + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    import sys

    update_readme(sys.argv[1] if len(sys.argv) > 1 else "config/README.md")
