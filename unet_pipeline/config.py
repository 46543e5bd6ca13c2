"""Workflow configuration: JSON-schema validation with messages that name the key.

`load_config` fills defaults from the schema, checks types and spelling
(a misspelt key is reported with the nearest valid one), then checks what a
schema cannot: slices against labels, tile sizes against the network.
"""
from __future__ import annotations

import copy
import difflib
import functools
import re
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from unet_pipeline.errors import ConfigError

# Package data: the schema travels with the package, so a wheel install validates configs.
SCHEMA = resources.files("unet_pipeline") / "schemas" / "config.schema.yaml"


@functools.cache
def _schema_text() -> str:
    return SCHEMA.read_text()


def load_schema() -> dict:
    return yaml.safe_load(_schema_text())


def defaults(section: str) -> dict:
    """The schema's defaults of one config section: the single place where defaults are written.

    The CLI's option defaults and `TrainConfig` read them from here.
    """
    schema = load_schema()
    values: dict = {}
    _fill_defaults({"properties": {section: schema["properties"][section]}}, values)
    return values[section]


def parse_slices(spec, num_slices: int | None = None, where: str = "slices") -> list[int]:
    """'all' | 'none' | '0-19' | '0-3,7' | [0, 1, 2] -> sorted list of indices."""
    if spec is None or spec == "none" or spec == []:
        return []
    if spec == "all":
        if num_slices is None:
            raise ConfigError(f"{where}: 'all' needs the stack size")
        return list(range(num_slices))
    if isinstance(spec, list):
        values = [int(v) for v in spec]
    else:
        values = []
        for part in str(spec).split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
            if not m:
                raise ConfigError(f"{where}: cannot read slice range {spec!r}; use e.g. '0-19' or [0, 1, 2]")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b < a:
                raise ConfigError(f"{where}: range {part.strip()!r} runs backwards")
            values.extend(range(a, b + 1))
    if num_slices is not None:
        bad = [v for v in values if v >= num_slices]
        if bad:
            raise ConfigError(f"{where}: slices {bad} do not exist (the stack has {num_slices} slices)")
    return sorted(set(values))


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        hints = []
        for key in extra:
            close = difflib.get_close_matches(key, allowed, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        prefix = "" if where == "(top level)" else where + "."
        return f"config key {', '.join(prefix + h for h in hints)} is not known; valid keys here: {', '.join(allowed)}"
    if error.validator == "required":
        return f"config key '{where}' is missing a required entry: {error.message}"
    return f"config key '{where}': {error.message}"


def _fill_defaults(schema: dict, data: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if "default" in sub and key not in data:
            data[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and "properties" in sub:
            data.setdefault(key, {})
            if isinstance(data[key], dict):
                _fill_defaults(sub, data[key])


def validate_config(config: dict) -> dict:
    """Validate a config mapping against the schema; returns a copy with defaults filled."""
    schema = load_schema()
    config = copy.deepcopy(dict(config))
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("; ".join(_describe(e) for e in errors[:5]))
    _fill_defaults(schema, config)
    synth_schema = schema["$defs"]["synthetic_stack"]
    for spec in config.get("synthetic", {}).values():
        _fill_defaults({"properties": synth_schema["properties"]}, spec)
    dataset_schema = schema["properties"]["datasets"]["additionalProperties"]
    for name, ds in config["datasets"].items():
        _fill_defaults(dataset_schema, ds)
        for key in ("train", "validate", "test"):
            if ds.get(key) != "all":
                parse_slices(ds.get(key), None, f"datasets.{name}.{key}")
            if ds.get(key) not in (None, [], "none") and "labels" not in ds:
                raise ConfigError(f"config key 'datasets.{name}.{key}' needs labels: add datasets.{name}.labels")
    if not any(ds.get("train") not in (None, [], "none") for ds in config["datasets"].values()):
        raise ConfigError("config key 'datasets': no dataset has training slices; set datasets.<name>.train")
    from unet_pipeline.model import UNetConfig

    model = UNetConfig(**config["model"])
    for section in ("train", "predict"):
        model.check_output_size(config[section]["tile_size"], f"{section}.tile_size")
    return config


def load_config(*paths: str | Path, overrides: dict | None = None) -> dict:
    """Merge YAML files (later ones win, mappings merged recursively) and validate."""
    merged: dict = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        merged = deep_merge(merged, data)
    return validate_config(deep_merge(merged, overrides or {}))


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
