"""The `lbc` command line: a thin shell over the library API."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path
from typing import NoReturn

import click

from lbc import api
from lbc.compiler.load import load
from lbc.compiler.lower import lower
from lbc.compiler.model import Cluster
from lbc.errors import ConfigError, LbcError, PluginError, UnsupportedError
from lbc.ir.trace import Origin, trace

EXIT_CONFIG = 2  # bad input: nothing was compiled, written or applied
EXIT_UNSUPPORTED = 3  # the chosen backend cannot express the config


def _fail(exc: LbcError) -> NoReturn:
    click.echo(f"lbc: {exc}", err=True)
    if isinstance(exc, UnsupportedError):
        sys.exit(EXIT_UNSUPPORTED)
    if isinstance(exc, ConfigError | PluginError):
        sys.exit(EXIT_CONFIG)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lbc")
def main() -> None:
    """lbc compiles Kubernetes-style Services in cluster.toml into load-balancer rules."""


@main.command("compile")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-b",
    "--backend",
    default="iptables",
    show_default=True,
    help="Backend to render with (`lbc backends` lists them).",
)
@click.option(
    "-f",
    "--format",
    "fmt",
    default="text",
    show_default=True,
    help="Output format: text (canonical, reviewable) or one the backend offers.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file instead of standard output.",
)
def compile_cmd(file: Path, backend: str, fmt: str, output: Path | None) -> None:
    """Compile FILE (cluster.toml) with a backend; no root and no kernel needed."""
    try:
        artifact = api.compile(load(file), backend=backend)
        text = artifact.text(fmt)
    except LbcError as exc:
        _fail(exc)
    if output is None:
        click.echo(text, nl=False)
    else:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(output)


@main.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check_cmd(file: Path) -> None:
    """Validate FILE and report every problem in it (exit 2 if there is one)."""
    try:
        cluster = load(file)
    except LbcError as exc:
        _fail(exc)
    click.echo(f"{file}: ok ({len(cluster.services)} services)")


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of cluster.toml."""
    schema = Cluster.model_json_schema()
    click.echo(json.dumps(schema, indent=2, sort_keys=True))


@main.command("backends")
def backends_cmd() -> None:
    """List every backend (built-in and plugins) with its capabilities."""
    try:
        found = api.backends()
    except LbcError as exc:
        _fail(exc)
    width = max(len(name) for name in found)
    for name, backend in found.items():
        click.echo(f"{name:<{width}}  {backend.description}")
        features = ", ".join(sorted(backend.features)) or "-"
        schedulers = ", ".join(sorted(backend.schedulers))
        click.echo(f"{'':<{width}}  features: {features}")
        click.echo(f"{'':<{width}}  schedulers: {schedulers}")


@main.command("explain")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "source", required=True, help="Source address of the packet.")
@click.option("--to", "dest", required=True, help="Destination ADDRESS:PORT ([v6]:port).")
@click.option(
    "--proto",
    default="tcp",
    show_default=True,
    type=click.Choice(["tcp", "udp", "sctp"], case_sensitive=False),
)
@click.option(
    "--origin",
    type=click.Choice([o.value for o in Origin]),
    help="Override where the packet comes from (default: from its address).",
)
def explain_cmd(file: Path, source: str, dest: str, proto: str, origin: str | None) -> None:
    """Explain where a new connection goes: frontend, pool, backends, masquerade."""
    try:
        address, port = _split_hostport(dest)
        ipaddress.ip_address(source)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        program = lower(load(file))
    except LbcError as exc:
        _fail(exc)
    result = trace(
        program, source, address, port, proto.lower(), Origin(origin) if origin else None
    )
    for step in result.steps:
        click.echo(step)
    click.echo(f"verdict: {result.verdict}")


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not ADDRESS:PORT")
    host = host.removeprefix("[").removesuffix("]")
    return str(ipaddress.ip_address(host)), int(port)
