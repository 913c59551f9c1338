"""YAML configs with ``--set key.sub=value`` overrides, validated into the job's pydantic model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from storage_schemas.errors import ConfigError

__all__ = ["ConfigError", "apply_override", "format_errors", "load_config"]

M = TypeVar("M", bound=BaseModel)


def apply_override(d: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value`` sets ``d['a']['b']['c']``; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set views.num_views=8")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {p!r} holds a value, not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(raw)


def format_errors(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({e.error_count()} problem{'s' if e.error_count() > 1 else ''}):"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key (not allowed here)" if err["type"] == "extra_forbidden" else err["msg"]
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        lines.append(f"  {loc}: {msg}{got if err['type'] != 'extra_forbidden' else ''}")
    return "\n".join(lines)


def load_config(model: type[M], path: str | Path | None, overrides: list[str] = (),
                base: dict[str, Any] | None = None) -> M:
    """Read YAML ``path`` (optional), apply ``overrides``, validate as ``model``."""
    d: dict[str, Any] = dict(base or {})
    source = str(path) if path else "config"
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        d.update(loaded or {})
    for o in overrides:
        apply_override(d, o)
    try:
        return model.model_validate(d)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


def finished_run(output: Path, config: dict) -> dict | None:
    """The ``final.json`` of the run folder ``output`` if it holds a run of this very config (its ``config.yaml``,
    which the trainer writes, equal to ``config``) that finished; else None (not run, unfinished, or another
    config). What ``kdcache sweep`` and ``kdcache train --ray`` check before starting Ray."""
    final, saved = output / "final.json", output / "config.yaml"
    if not final.exists() or not saved.exists() or yaml.safe_load(saved.read_text()) != config:
        return None
    return json.loads(final.read_text())
