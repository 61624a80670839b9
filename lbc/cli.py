"""The `lbc` command line: a thin shell over the library API."""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from lbc import api
from lbc.apply.lock import DEFAULT_LOCK
from lbc.apply.state import Action, Plan
from lbc.compiler.load import load
from lbc.compiler.lower import lower
from lbc.compiler.model import Cluster
from lbc.errors import ConfigError, LbcError, PluginError, UnsupportedError
from lbc.ir.trace import Origin, trace

_F = TypeVar("_F", bound=Callable[..., Any])

EXIT_PENDING = 1  # plan/verify/diff: there are differences
EXIT_CONFIG = 2  # bad input: nothing was compiled, written or applied
EXIT_UNSUPPORTED = 3  # the chosen backend cannot express the config
EXIT_KERNEL = 4  # the kernel refused; the previous state was kept or restored


def _fail(exc: LbcError) -> NoReturn:
    click.echo(f"lbc: {exc}", err=True)
    if isinstance(exc, UnsupportedError):
        sys.exit(EXIT_UNSUPPORTED)
    if isinstance(exc, ConfigError | PluginError):
        sys.exit(EXIT_CONFIG)
    sys.exit(EXIT_KERNEL)


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
        try:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(output)
        except OSError as exc:
            click.echo(f"lbc: cannot write {output}: {exc.strerror}", err=True)
            sys.exit(EXIT_CONFIG)


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
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} of {text!r} is out of range 1-65535")
    host = host.removeprefix("[").removesuffix("]")
    return str(ipaddress.ip_address(host)), int(port)


_ACTION_STYLE = {
    Action.ADD: ("+", "green"),
    Action.CHANGE: ("~", "yellow"),
    Action.REMOVE: ("-", "red"),
}


def _show_plan(plan: Plan, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(plan.to_json(), indent=2, sort_keys=True))
        return
    for change in plan.changes:
        mark, colour = _ACTION_STYLE[change.action]
        click.secho(f"{mark} {change.action} {change.key}", fg=colour, bold=True)
        for line in change.diff():
            fg = "green" if line.startswith("+") else "red" if line.startswith("-") else None
            click.secho(f"    {line}", fg=fg)
    click.echo(f"{plan.backend}: {plan.summary()}")


def _kernel_options(fn: _F) -> _F:
    fn = click.option("--netns", metavar="NAME", help="Act inside this named network namespace.")(
        fn
    )
    fn = click.option(
        "-b",
        "--backend",
        default="iptables",
        show_default=True,
        help="Backend whose kernel objects to manage.",
    )(fn)
    return fn


def _lock_options(fn: _F) -> _F:
    fn = click.option(
        "--lock-file",
        type=click.Path(path_type=Path),
        default=DEFAULT_LOCK,
        show_default=True,
        help="Host-wide lock serialising applies.",
    )(fn)
    fn = click.option(
        "--lock-timeout",
        type=float,
        default=30.0,
        show_default=True,
        help="Seconds to wait for another apply to finish.",
    )(fn)
    return fn


@main.command("plan")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_kernel_options
@click.option("-f", "--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def plan_cmd(file: Path, backend: str, netns: str | None, fmt: str) -> None:
    """Show what apply would change (exit 0 in sync, 1 changes pending)."""
    try:
        plan = api.plan(load(file), backend, netns=netns)
    except LbcError as exc:
        _fail(exc)
    _show_plan(plan, fmt)
    sys.exit(0 if plan.in_sync else EXIT_PENDING)


@main.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_kernel_options
@_lock_options
@click.option("--dry-run", is_flag=True, help="Plan and print, change nothing.")
@click.option("--full", is_flag=True, help="Rewrite everything lbc owns, not only changes.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Print each phase on stderr as it starts (default: when stderr is a terminal).",
)
def apply_cmd(
    file: Path,
    backend: str,
    netns: str | None,
    lock_file: Path,
    lock_timeout: float,
    dry_run: bool,
    full: bool,
    progress: bool | None,
) -> None:
    """Apply FILE to the kernel atomically (root)."""
    show = sys.stderr.isatty() if progress is None else progress
    started = time.perf_counter()

    def phase(message: str) -> None:
        click.echo(f"lbc: {time.perf_counter() - started:7.3f}s {message}", err=True)

    try:
        result = api.apply(
            load(file),
            backend,
            netns=netns,
            dry_run=dry_run,
            full=full,
            lock_path=lock_file,
            lock_timeout=lock_timeout,
            progress=phase if show else None,
        )
    except LbcError as exc:
        _fail(exc)
    if dry_run:
        _show_plan(result.plan, "text")
    click.echo(result.summary())


@main.command("verify")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_kernel_options
def verify_cmd(file: Path, backend: str, netns: str | None) -> None:
    """Detect drift: exit 1 and show it when the kernel differs from FILE."""
    try:
        drift = api.verify(load(file), backend, netns=netns)
    except LbcError as exc:
        _fail(exc)
    if drift.in_sync:
        click.echo(f"{backend}: kernel matches {file}")
        return
    _show_plan(drift, "text")
    click.echo(f"{backend}: drift detected; `lbc apply` restores {file}", err=True)
    sys.exit(EXIT_PENDING)


@main.command("delete")
@_kernel_options
@_lock_options
@click.option("--dry-run", is_flag=True, help="Show what would be removed.")
def delete_cmd(
    backend: str, netns: str | None, lock_file: Path, lock_timeout: float, dry_run: bool
) -> None:
    """Remove every kernel object lbc owns for the backend, nothing else."""
    try:
        result = api.delete(
            backend, netns=netns, dry_run=dry_run, lock_path=lock_file, lock_timeout=lock_timeout
        )
    except LbcError as exc:
        _fail(exc)
    if dry_run:
        _show_plan(result.plan, "text")
    click.echo(result.summary())


@main.command("diff")
@click.argument("old", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("new", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-b", "--backend", default="iptables", show_default=True)
def diff_cmd(old: Path, new: Path, backend: str) -> None:
    """The rule-level diff between two configs, without a kernel (exit 1 if they differ)."""
    try:
        text = api.diff(load(old), load(new), backend, old_name=str(old), new_name=str(new))
    except LbcError as exc:
        _fail(exc)
    for line in text.splitlines():
        fg = None
        if line.startswith("+") and not line.startswith("+++"):
            fg = "green"
        elif line.startswith("-") and not line.startswith("---"):
            fg = "red"
        click.secho(line, fg=fg)
    sys.exit(EXIT_PENDING if text else 0)
