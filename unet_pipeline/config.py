"""Workflow configuration: validation with messages that name the key, and every check knowable before running.

`validate_config` moves deprecated keys to their new names (with a warning),
checks types and spelling against the schema (a misspelt key is reported
with the nearest valid one), fills the schema's defaults, then checks what a
schema cannot: slices against labels, tile sizes against the network.
`check_sources` reads each stack's header (never its voxels): a missing
file, test or training slices past the end of a stack, or labels of another
shape are reported now, not after an hour of training. Nothing here imports
torch, so Snakemake validates a config in a fraction of a second.
"""
from __future__ import annotations

import copy
import difflib
import logging
import re
from pathlib import Path

import jsonschema
import yaml

from unet_pipeline import schema
from unet_pipeline.errors import ConfigError, InputError
from unet_pipeline.geometry import UNetConfig

log = logging.getLogger(__name__)


def parse_slices(spec, num_slices: int | None = None, where: str = "slices") -> list[int]:
    """'all' | 'none' | '0-19' | '0-3,7' | [0, 1, 2] -> sorted list of indices."""
    if not has_slices(spec):
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


def has_slices(spec) -> bool:
    """Whether a train/validate/test entry names any slices (None, [] and 'none' name none)."""
    return spec not in (None, [], "none")


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


def _move_deprecated(config: dict) -> dict:
    """Old key names still work: each is moved to its new name, with a warning naming both."""
    for old, new in schema.deprecated_keys().items():
        *old_parents, old_key = old.split(".")
        node = config
        for part in old_parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_key not in node:
            continue
        value = node.pop(old_key)
        *new_parents, new_key = new.split(".")
        target = config
        for part in new_parents:
            target = target.setdefault(part, {})
        if new_key in target:
            raise ConfigError(f"config keys '{old}' (deprecated) and '{new}' are both set; keep only '{new}'")
        target[new_key] = value
        log.warning("config key '%s' is deprecated: it now reads '%s' (same meaning); please rename it", old, new)
    return config


def validate_config(config: dict) -> dict:
    """Validate a config mapping against the schema; returns a copy with defaults filled."""
    config = _move_deprecated(copy.deepcopy(dict(config)))
    rules = schema.schema()
    errors = sorted(jsonschema.Draft202012Validator(rules).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("; ".join(_describe(e) for e in errors[:5]))
    schema.fill_defaults(rules, config)
    for spec in config.get("synthetic", {}).values():
        schema.fill_defaults({"properties": rules["$defs"]["synthetic_stack"]["properties"]}, spec)
    dataset_schema = rules["properties"]["datasets"]["additionalProperties"]
    for name, ds in config["datasets"].items():
        schema.fill_defaults(dataset_schema, ds)
        for key in ("train", "validate", "test"):
            if ds.get(key) != "all":
                parse_slices(ds.get(key), None, f"datasets.{name}.{key}")
            if has_slices(ds.get(key)) and "labels" not in ds:
                raise ConfigError(f"config key 'datasets.{name}.{key}' needs labels: add datasets.{name}.labels")
    if not any(has_slices(ds.get("train")) for ds in config["datasets"].values()):
        raise ConfigError("config key 'datasets': no dataset has training slices; set datasets.<name>.train")
    model = UNetConfig(**config["model"])
    for section in ("train", "predict"):
        model.check_output_size(config[section]["tile_size"], f"{section}.tile_size")
    return config


# --------------------------------------------------------------------------- the stacks themselves
def synthetic_path(config: dict, name: str, kind: str = "raw") -> str:
    """Where `unet-pipeline synth` writes synthetic stack `name` (kind 'raw' or 'labels')."""
    return f"{config['results_dir']}/synthetic/{name}/{kind}.tif"


def stack_shape(config: dict, path: str) -> tuple[int, int, int]:
    """A stack's shape from its header, or from its synthetic spec before it is generated (InputError if neither)."""
    for name, spec in config.get("synthetic", {}).items():
        if path in (synthetic_path(config, name, "raw"), synthetic_path(config, name, "labels")):
            return (int(spec["slices"]), *map(int, spec["shape"]))
    from unet_pipeline import sources  # reads headers with tifffile/zarr: only when sources are checked

    return sources.header(path).shape


def _dataset_shape(config: dict, name: str, key: str) -> tuple[int, int, int]:
    try:
        return stack_shape(config, config["datasets"][name][key])
    except InputError as exc:
        raise ConfigError(f"config key 'datasets.{name}.{key}': {exc}") from None


def check_sources(config: dict) -> dict:
    """Check every dataset against its stacks' headers before anything runs; returns {dataset: shape}.

    Raises ConfigError naming the key for a missing or unreadable stack,
    labels of another shape, or train/validate/test slices past the end of
    the stack.
    """
    shapes = {}
    for name, ds in config["datasets"].items():
        shape = _dataset_shape(config, name, "raw")
        if "labels" in ds:
            labels = _dataset_shape(config, name, "labels")
            if labels != shape:
                raise ConfigError(f"config key 'datasets.{name}.labels': {ds['labels']} has shape {labels}, but the "
                                  f"raw stack {ds['raw']} has shape {shape}; they must match voxel for voxel")
        for key in ("train", "validate", "test"):
            parse_slices(ds.get(key), shape[0], f"config key 'datasets.{name}.{key}'")
        shapes[name] = shape
    return shapes


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
    """`extra` merged into a copy of `base`, mappings key by key (later config files win)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
