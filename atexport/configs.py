"""Recipes, presets and tolerances as data.

Training recipes live in ``training/``, export presets and parity tolerances in ``export_configs/``,
calibration-set definitions in ``calibration/`` (all YAML, at the top of the source tree). A name such as
``"digits"`` resolves to ``<dir>/digits.yaml``; a path to an existing file is read as it is. The folders
are found under ``$ATEXPORT_CONFIG_ROOT``, beside the package (source checkout or editable install), or
where a wheel installs them (``<prefix>/share/atexport``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from atexport.errors import BadInputError

KINDS = ("training", "export_configs", "calibration")


def config_root() -> Path:
    """``$ATEXPORT_CONFIG_ROOT``, else the source tree beside the package, else ``<prefix>/share/atexport``."""
    env = os.environ.get("ATEXPORT_CONFIG_ROOT")
    if env:
        return Path(env)
    source = Path(__file__).resolve().parent.parent
    if (source / "training").is_dir():
        return source
    import sys

    return Path(sys.prefix) / "share" / "atexport"


def config_dir(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; expected one of {KINDS}")
    return config_root() / kind


def available(kind: str) -> list[str]:
    d = config_dir(kind)
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def is_file(p: Path) -> bool:
    """``Path.is_file`` that says no (instead of raising) for impossible names."""
    try:
        return p.is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte
        return False


def resolve(kind: str, name_or_path: str | os.PathLike) -> Path:
    """Find a config by name in its folder, or take an explicit YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or is_file(p):  # a folder named like a recipe (runs' output) is not one
        if not is_file(p):
            raise BadInputError(f"{kind} config {p}: no such file.")
        return p
    candidate = config_dir(kind) / f"{name_or_path}.yaml"
    if is_file(candidate):
        return candidate
    names = ", ".join(available(kind)) or "(none found)"
    raise BadInputError(
        f"no {kind} config named {name_or_path!r} in {config_dir(kind)}; available: {names}. "
        f"Pass a YAML file path, or set ATEXPORT_CONFIG_ROOT to the folder holding {kind}/."
    )


def load(kind: str, name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Load a YAML config into a dict (clear error on a malformed file)."""
    import yaml

    path = resolve(kind, name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}).") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read it ({e.strerror}).") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise BadInputError(f"{path}: not valid YAML ({str(e)[:300]}).") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
    data.setdefault("_source", str(path))
    return data


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; ``override`` wins, ``None`` values in it are ignored."""
    out = dict(base)
    for k, v in override.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
