"""Read cluster.toml: TOML parse, schema validation, semantic checks, all errors at once."""

from __future__ import annotations

import ast
import copy
import datetime
import difflib
import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path as FsPath
from typing import Any, TypeVar

import tomli
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticSerializationError

from lbc.collector import paused
from lbc.compiler import model
from lbc.compiler.checks import Found, Partial, check
from lbc.compiler.locate import (
    Path,
    definitions,
    format_path,
    key_lines,
    line_of,
    long_integer,
    toml_key,
)
from lbc.compiler.model import Cluster, Endpoint, Node, Service, ServicePort, number, quote
from lbc.compiler.prevalidate import prevalidate
from lbc.errors import ConfigError, Problem, UsageError

_M = TypeVar("_M", bound=BaseModel)


def load(source: str | bytes | os.PathLike[str]) -> Cluster:
    """Load a cluster from a file or from TOML text.

    A `Path` (any `os.PathLike`) is a file. A string is TOML text when it has a
    newline, is empty, or has a `=` and names no existing file; otherwise it is a
    file's path. Bytes are TOML text in UTF-8.
    """
    if isinstance(source, os.PathLike):
        return loads(read(FsPath(source)), filename=os.fspath(source))
    if isinstance(source, bytes):
        return loads(source)
    if not isinstance(source, str):
        raise UsageError(f"load() takes a path or TOML text, not {type(source).__name__}")
    if not source or "\n" in source or ("=" in source and not os.path.exists(source)):
        return loads(source)
    return loads(read(FsPath(source)), filename=source)


@paused
def loads(text: str | bytes, filename: str = "<string>") -> Cluster:
    """Parse and validate cluster.toml text; raise `ConfigError` listing every problem.

    `filename` is what the problems name. Bytes are decoded as UTF-8.
    """
    if isinstance(text, bytes):
        text = _decode(text, filename)
    elif not isinstance(text, str):
        raise UsageError(f"loads() takes TOML text (str or bytes), not {type(text).__name__}")
    # A byte order mark, as some editors write at the start of a UTF-8 file, is not
    # TOML; it is not a line either, so line numbers stay as they were.
    text = text.removeprefix("\ufeff")
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        raise ConfigError([_toml_problem(exc, text, filename)]) from None
    except RecursionError:  # tomli's limit on nesting, or Python's own
        message = "malformed TOML: tables or arrays are nested too deeply"
        raise ConfigError([Problem(filename, "", None, message)]) from None
    except ValueError:
        # Python's limit on the digits of a decimal integer it converts (4300); tomli
        # lets its ValueError through, without a position. No TOML integer is that
        # long: the spec's integers are 64-bit.
        raise ConfigError([_long_integer_problem(text, filename)]) from None
    return _checked(data, text, filename)


@paused
def validate(cluster: Cluster) -> Cluster:
    """`cluster`, checked as `loads` checks a file; raise `ConfigError` listing every problem.

    For a cluster built or changed in code: pydantic does not validate what
    `model_copy(update=...)` puts in, and `Cluster.model_validate` of a `Cluster`
    returns it unchecked, while `lbc.lower` and the backends assume a valid cluster.
    The problems name key paths (`services[2].ports[0].port`) without lines. Returns
    a validated copy.
    """
    if not isinstance(cluster, Cluster):
        raise UsageError(f"validate() takes a Cluster, not {type(cluster).__name__}")
    # (no serializer warnings: values of the wrong type are what this call looks for)
    try:
        data = cluster.model_dump(mode="json", exclude_unset=True, warnings=False)
    except PydanticSerializationError:
        # A value JSON has no form for: checked as it is, so that its key is named.
        data = cluster.model_dump(exclude_unset=True, warnings=False)
    return _checked(_with_unknown_keys(cluster, data), "", "<cluster>")


def _with_unknown_keys(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """`data`, the dump of `model`, with the keys that are no field of their model put
    back: `model_copy(update=...)` keeps a misspelt key in the model, and no dump has it."""
    fields = type(model).model_fields
    for key, value in model.__dict__.items():
        if key not in fields:
            data[key] = value
            continue
        dumped = data.get(key)
        if isinstance(value, BaseModel) and isinstance(dumped, dict):
            _with_unknown_keys(value, dumped)
        elif isinstance(value, list | tuple) and isinstance(dumped, list | tuple):
            for item, part in zip(value, dumped, strict=False):
                if isinstance(item, BaseModel) and isinstance(part, dict):
                    _with_unknown_keys(item, part)
    return data


def _checked(data: dict[str, Any], text: str, filename: str) -> Cluster:
    """The cluster of parsed `data`, or `ConfigError` naming lines of `text` if any."""
    try:
        cluster = Cluster.model_validate(prevalidate(data))
    except ValidationError:
        try:  # again on the data as written, so that every error is pydantic's own
            cluster = Cluster.model_validate(data)
        except ValidationError as exc:
            # Report the schema errors together with what the semantic checks find in
            # the parts that are valid, so that one run shows every problem.
            found, unknown = _schema_problems(exc, data)
            found += check(*_valid_parts(_without(data, unknown)))
            raise _config_error(text, filename, found) from None
    found = check(cluster.node, list(enumerate(cluster.services)))
    if found:
        raise _config_error(text, filename, found)
    return cluster


def read(path: FsPath) -> str:
    """The text of the config file at `path`; `ConfigError` naming it if it cannot be
    read or is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError([Problem(str(path), "", None, f"cannot read file: {reason}")]) from None
    except ValueError as exc:  # such as a NUL character in the path
        raise ConfigError([Problem(repr(str(path)), "", None, f"not a path: {exc}")]) from None
    return _decode(raw, str(path))


def _decode(raw: bytes, filename: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        byte = raw[exc.start]
        message = f"not UTF-8 text (byte {byte:#04x}); save the file as UTF-8"
        raise ConfigError([Problem(filename, "", line, message)]) from None


def _long_integer_problem(text: str, filename: str) -> Problem:
    found = long_integer(text, sys.get_int_max_str_digits() or len(text))
    if found is None:  # not where the locator looks: say what is known
        return Problem(filename, "", None, "malformed TOML: an integer is too large")
    path, line, digits = found
    message = f"integer too large ({digits} digits; a TOML integer fits in 64 bits)"
    return Problem(filename, format_path(path), line, message)


def _toml_problem(exc: tomli.TOMLDecodeError, text: str, filename: str) -> Problem:
    message = str(getattr(exc, "msg", exc))
    line: int | None = getattr(exc, "lineno", None)
    if message == "Illegal character '\\n'":
        message = "a string is not closed before the end of its line"
    elif message == "Cannot overwrite a value":
        message = "this key is already set; a key may be given only once"
    elif message.startswith(_CONFLICTS):
        # tomli names the key as a Python tuple and does not say what is in the way.
        message = _conflict(message, text, line) or message
    column = getattr(exc, "colno", None)
    where = f" (column {column})" if column else ""
    return Problem(filename, "", line, f"malformed TOML{where}: {message}")


_CONFLICTS = (
    "Cannot declare (",
    "Cannot mutate immutable namespace (",
    "Cannot redefine namespace (",
)


def _conflict(message: str, text: str, line: int | None) -> str | None:
    """tomli's "Cannot declare/mutate/redefine ('a', 'b') ..." worded with the TOML keys.

    What is in the way is found by reading the document up to `line` (where tomli
    stopped): the first leading part of the key written as a value (an inline table or
    an array, which cannot be extended), or else how the key itself was written.
    """
    verb, _, rest = message.partition(" (")
    try:
        key = ast.literal_eval("(" + rest.removesuffix(" twice"))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(key, tuple) or not key or not all(isinstance(k, str) for k in key):
        return None
    start = 0
    for _ in range((line or 1) - 1):
        start = text.find("\n", start) + 1
    header = text[start:].lstrip(" \t").startswith("[")
    written = definitions(text[:start], key)
    blocker = next((d for d in written if d.kind in _VALUE_KINDS), None)
    name = toml_key(key)
    if verb == "Cannot declare":
        if blocker is not None:
            what = f"{toml_key(blocker.key)} is {_VALUE_KINDS[blocker.kind]} (line {blocker.line})"
            if blocker.key == key:
                return f"table [{name}] cannot be declared: {what}"
            return f"table [{name}] cannot be declared: {what}, which cannot be extended"
        first = written[-1]
        if first.kind == "array of tables":
            return (
                f"[{name}] is an array of tables ([[{name}]], line {first.line}); "
                f"add an element with [[{name}]]"
            )
        if first.kind == "dotted":
            return f"table [{name}] is declared twice (by dotted keys on line {first.line})"
        if first.line is not None:
            return f"table [{name}] is declared twice (first on line {first.line})"
        return f"table [{name}] is declared twice"
    if verb == "Cannot mutate immutable namespace":
        if blocker is None:  # the locator lost track: still no Python tuple
            return f"{name} is an inline table or an array: it cannot be extended"
        what = f"{toml_key(blocker.key)} is {_VALUE_KINDS[blocker.kind]} (line {blocker.line})"
        if header and blocker.kind == "array":
            return (
                f"[[{name}]] cannot add to {toml_key(blocker.key)}, an array written as a "
                f"value (line {blocker.line}); write every element in that array, or each "
                f"as [[{name}]]"
            )
        if blocker.kind == "inline table":
            return f"{what}: every key of an inline table is written inside its braces"
        return f"{what}, not a table: it cannot hold keys"
    if verb == "Cannot redefine namespace":
        first = written[-1]
        where = f" (line {first.line})" if first.line is not None else ""
        return (
            f"table [{name}] is declared by its header{where}; dotted keys cannot add to "
            f"it: write the key under [{name}]"
        )
    return None


# Values that are complete where they are written: no header or dotted key adds to them.
_VALUE_KINDS = {"inline table": "an inline table", "array": "an array", "value": "a value"}


def _config_error(text: str, filename: str, found: list[Found]) -> ConfigError:
    lines = key_lines(text)
    problems = [Problem(filename, format_path(p), line_of(lines, p), msg) for p, msg in found]
    problems.sort(key=lambda p: p.line or 0)  # stable: same-line problems keep their order
    return ConfigError(problems)


def _valid_parts(
    data: dict[str, Any],
) -> tuple[Node | None, list[tuple[int, Service]], list[Partial]]:
    """The node and the services that pass the schema on their own, for semantic checks,
    and what passes of the services that do not (`checks.check`)."""
    node = _try(Node, data.get("node"))
    services: list[tuple[int, Service]] = []
    partial: list[Partial] = []
    raw = data.get("services")
    if isinstance(raw, list):
        for i, item in enumerate(raw):
            svc = _try(Service, item)
            if svc is not None:
                services.append((i, svc))
                continue
            part = _partial(item)
            if part is not None:
                partial.append((i, *part))
    return node, services, partial


def _partial(item: object) -> tuple[Service, frozenset[str]] | None:
    """A service that fails the schema, as far as it passes: a `Service` of the keys
    that are valid each on its own (a broken or missing list is empty), and the set of
    the broken or missing keys. None without a valid namespace and name, which the
    checks across services tell services apart by."""
    if not isinstance(item, dict):
        return None
    values: dict[str, Any] = {}
    broken: set[str] = set()
    for key, field in Service.model_fields.items():
        if key not in item:
            if field.is_required():
                broken.add(key)
            continue
        part = _try(_key_model(key), {key: item[key]})
        if part is None:
            broken.add(key)
        else:
            values[key] = getattr(part, key)
    if {"namespace", "name"} & broken:
        return None
    for key in ("cluster_ips", "ports"):
        values.setdefault(key, [])
    return Service.model_construct(**values), frozenset(broken)


@functools.cache
def _key_model(key: str) -> type[BaseModel]:
    """A model of the one key `key` of a service, validated as `Service` validates it."""
    field = Service.model_fields[key]
    config = ConfigDict(extra="forbid", frozen=True, strict=True)
    # (untyped: mypy cannot match a computed keyword argument to create_model's overloads)
    make: Any = create_model
    model: type[BaseModel] = make(
        f"Service_{key}", __config__=config, **{key: (field.annotation, field)}
    )
    return model


def _without(data: dict[str, Any], paths: list[Path]) -> dict[str, Any]:
    """`data` without the keys at `paths` (unknown keys, already reported).

    Only the tables and arrays on those paths are copied: `data` stays as it was, and
    no part of it is walked that the paths do not lead to (it may be nested deeply).
    """
    pruned = dict(data)
    for path in paths:
        parent: Any = pruned
        for part in path[:-1]:
            if not _has(parent, part):
                parent = None
                break
            child = parent[part]
            if isinstance(child, dict | list):
                child = parent[part] = copy.copy(child)
            parent = child
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return pruned


def _try(cls: type[_M], value: object) -> _M | None:
    try:
        return cls.model_validate(value)
    except ValidationError:
        return None


# --- wording of schema errors ------------------------------------------------------


def _schema_problems(exc: ValidationError, data: dict[str, Any]) -> tuple[list[Found], list[Path]]:
    """The schema errors as `(path, message)`, and the paths of the unknown keys."""
    errors = exc.errors(include_url=False)
    locs = [_clean_loc(e["loc"], data, last_is_key=e["type"] == "missing") for e in errors]
    unknown = [loc for e, loc in zip(errors, locs, strict=True) if e["type"] == "extra_forbidden"]
    # A misspelt required key shows up twice: unknown `clusterIPs`, missing `cluster_ips`.
    # The unknown key's suggestion already says it all, so drop the "missing" half.
    guessed = {(*loc[:-1], _closest(loc[:-1], str(loc[-1]), None)) for loc in unknown}
    out: list[Found] = []
    seen: set[Path] = set()
    for err, loc in zip(errors, locs, strict=True):
        if err["type"] == "missing" and loc in guessed:
            continue
        if loc in seen and err["type"] not in ("missing", "extra_forbidden"):
            continue  # a union reports one failure per member; one is enough
        seen.add(loc)
        out.append((loc, _message(err, loc)))
    return out, unknown


def _clean_loc(loc: tuple[int | str, ...], data: object, last_is_key: bool) -> Path:
    """Keep the parts of pydantic's `loc` that are keys in the data (not union tags)."""
    keep: list[str | int] = []
    node = data
    for n, part in enumerate(loc):
        if _has(node, part):
            node = node[part]  # type: ignore[index]
        elif not (last_is_key and n == len(loc) - 1):
            continue
        keep.append(part)
    return tuple(keep)


def _has(node: object, part: int | str) -> bool:
    if isinstance(node, Mapping):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


_TYPES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "tuple_type": "an array",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
}

_LABEL_RULE = "a DNS label (lower-case letters, digits and '-', not at either end)"
_PATTERNS = {
    model.DNS_LABEL: _LABEL_RULE,
    model.PORT_NAME: _LABEL_RULE,
    model.DNS_SUBDOMAIN: "a DNS name (DNS labels joined by '.')",
    model.LABEL_VALUE: "a label value (letters, digits, '-', '_' and '.', not at either end)",
}


def _message(err: Any, loc: Path) -> str:
    kind: str = err["type"]
    value = err["input"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    name = str(loc[-1]) if loc and isinstance(loc[-1], str) else "value"
    if kind == "missing":
        return f"missing required key {name!r}"
    if kind == "extra_forbidden":
        return f"unknown key {quote(name)}" + (
            _suggest(loc[:-1], name, None) or _home(loc[:-1], name)
        )
    if kind in _TYPES:
        return f"expected {_TYPES[kind]}, got {_describe(value)}"
    if kind == "wrong_type":
        return f"expected {ctx['expected']}, got {_describe(value)}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return _out_of_range(loc, name, value)
    if kind == "literal_error":
        if not isinstance(value, str):
            return f"expected one of {ctx['expected']}, got {_describe(value)}"
        options = [o.strip("'") for o in str(ctx["expected"]).replace(" or ", ", ").split(", ")]
        return f"{name} {quote(value)} is not one of {ctx['expected']}" + _suggest(
            loc[:-1], value, options
        )
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        return f"{name} must not be empty" if least == 1 else f"{name} needs {least} or more items"
    if kind == "too_long":
        return f"{name} has {ctx.get('actual_length')} items; at most {ctx['max_length']} allowed"
    if kind == "string_too_short":
        return f"{name} must not be empty"
    if kind == "string_too_long":
        return f"{name} is {len(value)} characters long; at most {ctx['max_length']} allowed"
    if kind == "string_pattern_mismatch":
        rule = _PATTERNS.get(str(ctx.get("pattern")), f"matching {ctx.get('pattern')}")
        return f"{name} {quote(value)} is not {rule}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind == "value_error":
        return msg
    return f"{msg} (got {_describe(value)})"


def _describe(value: object) -> str:
    """A TOML value as a user would name it: `the string '80'`, `an array`, ..."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {number(value)}"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, str):
        return f"the string {quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return "a date/time"
    return type(value).__name__


def _out_of_range(loc: Path, name: str, value: object) -> str:
    low, high = _bounds(_field_at(loc))
    if isinstance(value, int):
        value = number(value)
    if low is not None and high is not None:
        return f"{name} {value} is out of range {low}-{high}"
    if low is not None:
        return f"{name} {value} must be at least {low}"
    if high is not None:
        return f"{name} {value} must be at most {high}"
    return f"{name} {value} is out of range"


def _bounds(field: FieldInfo | None) -> tuple[int | None, int | None]:
    """The `ge`/`le` limits of a field, also when they sit inside `Annotated[...] | None`."""
    low: int | None = None
    high: int | None = None
    stack: list[Any] = [field]
    while stack:
        item = stack.pop()
        if item is None:
            continue
        low = getattr(item, "ge", None) if low is None else low
        high = getattr(item, "le", None) if high is None else high
        stack += getattr(item, "metadata", None) or []
        stack += getattr(item, "__metadata__", ())
        stack += getattr(item, "__args__", ())
        if isinstance(item, FieldInfo):
            stack.append(item.annotation)
    return low, high


def _suggest(table: Path, word: str, options: list[str] | None) -> str:
    """`; did you mean 'x'?` for a close option, or nothing."""
    close = _closest(table, word, options)
    return f"; did you mean {close!r}?" if close else ""


# The tables of cluster.toml, each with its header: where `_home` looks for a key.
_TABLES: tuple[tuple[type[BaseModel], str], ...] = (
    (Node, "[node]"),
    (Service, "[[services]]"),
    (ServicePort, "[[services.ports]]"),
    (Endpoint, "[[services.endpoints]]"),
)


def _home(table: Path, word: str) -> str:
    """`; weight belongs in [[services.endpoints]]` for a key of another table, or nothing.

    A key written in the wrong table (an endpoint's `weight` directly under
    `[[services]]`, a top-level `[[endpoints]]`) is no misspelling: say where it goes.
    """
    here = _model_at(table)
    homes: list[str] = []
    for table_model, header in _TABLES:
        field = table_model.model_fields.get(word)
        if table_model is here or field is None:
            continue
        if _inner_model(field.annotation) is not None:  # a table of its own: its header
            return f"; {word} belong in a service, as [[services.{word}]]"
        homes.append(header)
    if not homes:
        return ""
    where = homes[0] if len(homes) == 1 else f"{', '.join(homes[:-1])} or {homes[-1]}"
    return f"; {word} belongs in {where}"


def _closest(table: Path, word: str, options: list[str] | None) -> str | None:
    """The option closest to `word`, compared case- and `_`-insensitively.

    `options` defaults to the keys of the table at `table`.
    """
    if options is None:
        found = _model_at(table)
        options = list(found.model_fields) if found is not None else []
    by_norm = {_norm(o): o for o in options}
    close = difflib.get_close_matches(_norm(word), list(by_norm), n=1, cutoff=0.6)
    return by_norm[close[0]] if close else None


def _norm(word: str) -> str:
    # `clusterIPs` and `targetPort` (Kubernetes' spelling) should find their snake_case keys.
    return word.lower().replace("_", "").replace("-", "")


def _field_at(loc: Path) -> FieldInfo | None:
    parent = _model_at(loc[:-1])
    return None if parent is None or not loc else parent.model_fields.get(str(loc[-1]))


def _model_at(loc: Path) -> type[BaseModel] | None:
    found: type[BaseModel] = Cluster
    for part in loc:
        if isinstance(part, int):
            continue
        field = found.model_fields.get(part)
        inner = _inner_model(field.annotation) if field is not None else None
        if inner is None:
            return None
        found = inner
    return found


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None
