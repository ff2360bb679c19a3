"""The field tables of transformers' and peft's classes, cached on disk per library version.

Reading TrainingArguments' or LoraConfig's type hints imports transformers, peft, torch and
bitsandbytes: ~6 s of a CPU login node's time before ftlib can say a key is misspelt or a model
is missing. The tables are plain data (names, choices, element types), so the first load writes
them as JSON under ~/.cache/ftlib (or $FTLIB_CACHE_DIR), keyed by the library versions and this
package's checker code; later loads read the JSON and import nothing. A table that cannot be
written as JSON (an annotation this module does not know) is simply not cached.
"""
from __future__ import annotations

import enum
import hashlib
import json
import os
import typing
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal

from ..storage import atomic_write_text

SPEC_VERSION = 1   # bump when the JSON form below changes


class Unmodeled:
    """Stands for a class the checker does not model (it lets the library judge the value)."""


class _NotCacheable(Exception):
    pass


# ---------------------------------------------------------------------------- hint <-> JSON
_SCALARS = {bool: "bool", int: "int", float: "float", str: "str", type(None): "none"}


def to_spec(tp: Any) -> Any:
    """A JSON form of annotation `tp`, keeping exactly what fields._check_value looks at."""
    import types
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return "any"
    if origin in (typing.Union, types.UnionType):
        return {"union": [to_spec(a) for a in typing.get_args(tp)]}
    if origin is Literal:
        values = list(typing.get_args(tp))
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            raise _NotCacheable(tp)
        return {"literal": values}
    if origin in (list, tuple, typing.List):
        inner = typing.get_args(tp)
        return {"list": to_spec(inner[0]) if inner and inner[0] is not Ellipsis else None}
    if origin is dict or tp is dict:
        return "dict"
    if tp in _SCALARS:
        return _SCALARS[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if not all(isinstance(v, (bool, int, float, str)) for v in values):
            raise _NotCacheable(tp)
        return {"enum": tp.__name__, "values": values}
    return "other"


def from_spec(spec: Any) -> Any:
    """The annotation that to_spec wrote (enums come back as enums with the same values)."""
    named = {"any": Any, "dict": dict, "other": Unmodeled, **{v: k for k, v in _SCALARS.items()}}
    if isinstance(spec, str):
        return named[spec]
    if "union" in spec:
        members = tuple(from_spec(a) for a in spec["union"])
        return typing.Union[members]
    if "literal" in spec:
        return Literal[tuple(spec["literal"])]
    if "list" in spec:
        return typing.List if spec["list"] is None else list[from_spec(spec["list"])]
    if "enum" in spec:
        return enum.Enum(spec["enum"], {f"v{i}": v for i, v in enumerate(spec["values"])})
    raise ValueError(f"unknown hint spec {spec!r}")


# ---------------------------------------------------------------------------- the cache
def cache_dir() -> Path:
    explicit = os.environ.get("FTLIB_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftlib"


@lru_cache(maxsize=None)
def _checker_hash() -> str:
    """The code that reads the tables (fields.py and this file), hashed once per process."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in ("fields.py", "hint_cache.py"))).hexdigest()


def _key(libraries: tuple[str, ...]) -> str:
    """Library versions plus the code that reads the tables: either changing makes a new file."""
    parts = [str(SPEC_VERSION)]
    for name in libraries:
        try:
            parts.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name}=missing")
    parts.append(_checker_hash())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cached_hints(name: str, libraries: tuple[str, ...], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The field table `name`: from the cache when this library version wrote it, else built
    (importing the libraries) and written for the next process."""
    path = cache_dir() / f"{name}-{_key(libraries)}.json"
    try:
        return {key: from_spec(spec) for key, spec in json.loads(path.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hints = build()
    try:
        text = json.dumps({key: to_spec(tp) for key, tp in hints.items()}, sort_keys=True)
    except _NotCacheable:
        return hints
    try:   # atomically: ranks of one job may write it at the same moment
        atomic_write_text(path, text)
    except OSError:   # a read-only or full home: every load builds the table, as before
        pass
    return hints
