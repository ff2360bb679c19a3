"""Load a config: YAML with `defaults:` inheritance, `key=value` overrides from the command line,
interpolations resolved, then validated (validate.py). Every value remembers where it came from
(a file, or the command line), so an error names the right one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import COMMAND_LINE, ConfigError, RunConfig
from .validate import validate


def _leaf_origins(node: Any, source: str, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_leaf_origins(value, source, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): source}
    return {prefix.rstrip("."): source}


def _load_yaml(path: Path, origins: dict[str, str], seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        where = f" (inherited by {seen[-1]})" if seen else ""
        raise ConfigError(f"{path}: config file not found{where}; check the path")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: defaults inherit in a cycle; remove it from defaults")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as exc:  # YAML syntax errors carry a multi-line message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    merged: dict = {}
    for parent in data.pop("defaults", None) or []:
        parent_path = (path.parent / str(parent)).resolve()
        if not parent_path.suffix:
            parent_path = parent_path.with_suffix(".yaml")
        merged = _merge(merged, _load_yaml(parent_path, origins, (*seen, path.resolve())))
    origins.update(_leaf_origins(data, str(path)))
    return _merge(merged, data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("sweep", "tasks"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Load, inherit, override, resolve and validate a run config."""
    path = Path(path)
    origins: dict[str, str] = {}
    data = _load_yaml(path, origins)
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{COMMAND_LINE}: override '{item}' is not key=value "
                              "(e.g. training.learning_rate=1e-4)")
    try:
        cli = OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{COMMAND_LINE}: bad override: {str(exc).splitlines()[0]}") from None
    origins.update(_leaf_origins(cli, COMMAND_LINE))
    data = _merge(data, cli)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: cannot resolve an interpolation: {str(exc).splitlines()[0]}") from None
    return validate(resolved, source=str(path), origins=origins)
