"""Read cluster.toml: TOML parse, schema validation, semantic checks, all errors at once."""

from __future__ import annotations

import difflib
import os
from pathlib import Path as FsPath
from typing import Any

import tomli
from pydantic import BaseModel, ValidationError

from lbc.compiler.checks import check
from lbc.compiler.locate import Path, format_path, key_lines, line_of
from lbc.compiler.model import Cluster
from lbc.errors import ConfigError, Problem


def load(source: str | os.PathLike[str]) -> Cluster:
    """Load a cluster from a path (`Path` or a one-line string) or from TOML text."""
    if isinstance(source, os.PathLike) or "\n" not in source:
        path = FsPath(source)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([Problem(str(path), "", None, f"cannot read file: {exc}")]) from None
        return loads(text, filename=str(path))
    return loads(source)


def loads(text: str, filename: str = "<string>") -> Cluster:
    """Parse and validate cluster.toml text; raise `ConfigError` listing every problem."""
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        message = getattr(exc, "msg", str(exc))
        raise ConfigError([Problem(filename, "", line, f"malformed TOML: {message}")]) from None
    try:
        cluster = Cluster.model_validate(data)
    except ValidationError as exc:
        raise _config_error(text, filename, _schema_problems(exc, data)) from None
    found = check(cluster)
    if found:
        raise _config_error(text, filename, found)
    return cluster


def _config_error(text: str, filename: str, found: list[tuple[Path, str]]) -> ConfigError:
    lines = key_lines(text)
    problems = [Problem(filename, format_path(p), line_of(lines, p), msg) for p, msg in found]
    problems.sort(key=lambda p: (p.line or 0, p.path))
    return ConfigError(problems)


def _schema_problems(exc: ValidationError, data: dict[str, Any]) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            message = f"unknown key {str(loc[-1])!r}" + _suggest(loc)
        elif err["type"] == "missing":
            message = "missing required key"
        elif err["type"] in ("literal_error", "enum"):
            expected = err.get("ctx", {}).get("expected", "")
            message = f"must be one of {expected}, not {err['input']!r}"
        else:
            message = _message(err)
        if loc in seen and err["type"] not in ("missing", "extra_forbidden"):
            continue  # a union reports one failure per member; one line is enough
        seen.add(loc)
        out.append((loc, message))
    return out


def _clean_loc(loc: tuple[int | str, ...]) -> Path:
    # pydantic inserts union member and validator tags into `loc`; keep only real keys.
    keep: list[str | int] = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        keep.append(part)
    return tuple(keep)


def _message(err: Any) -> str:
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    if err["type"] == "string_pattern_mismatch" and "a-z0-9" in str(err.get("ctx", {})):
        return f"{err['input']!r} is not a DNS label (lower-case letters, digits and '-')"
    return f"{msg} (got {err['input']!r})" if not isinstance(err["input"], dict | list) else msg


def _suggest(loc: Path) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_at(loc: Path) -> type[BaseModel] | None:
    model: type[BaseModel] = Cluster
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        inner = _inner_model(field.annotation)
        if inner is None:
            return None
        model = inner
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None
