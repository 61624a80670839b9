"""The `lbc` command line: a thin shell over the library API."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from lbc import api
from lbc.apply.lock import DEFAULT_LOCK
from lbc.apply.state import Action, Plan
from lbc.backends.base import Backend
from lbc.compiler.load import load, loads, read
from lbc.compiler.lower import lower
from lbc.compiler.model import Cluster, Node, quote
from lbc.compiler.notes import as_problems as notes
from lbc.errors import ConfigError, LbcError, PluginError, UnsupportedError
from lbc.ir.trace import Origin, trace
from lbc.plugins import resolve
from lbc.session import Session
from lbc.watch import Event, Outcome, watch

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


EXIT_INTERRUPTED = 130  # SIGINT (128 + 2), as a shell reports it


def _interrupted() -> NoReturn:
    """Ctrl-C during an apply or delete: the engine holds it back while it writes."""
    click.echo(
        "lbc: interrupted; a commit in progress was finished, never left half made "
        "(`lbc verify` tells whether the kernel holds the new rules)",
        err=True,
    )
    sys.exit(EXIT_INTERRUPTED)


class _OutputError(Exception):
    """Standard output cannot be written (a full disk, a closed file; not a broken pipe)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


def _echo(message: str = "", *, nl: bool = True, **style: Any) -> None:
    """`click.secho` to standard output; a failed write becomes `_OutputError`."""
    try:
        click.secho(message, nl=nl, **style)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # click's own handling: the reader went away, exit quietly
        raise _OutputError(exc) from None


class _Main(click.Group):
    """The `lbc` group: reports a failed write to standard output in one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            _flush()
        except _OutputError as exc:
            _cannot_write(exc.error)
        return result

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # `--help` and `--version` print while click parses the command line, before
        # `invoke`: a failed write there surfaces here.
        try:
            return super().main(*args, **kwargs)
        except OSError as exc:
            if exc.errno not in _WRITE_ERRORS:
                raise
            _cannot_write(exc)


# What a write to a full, failing or closed standard output raises (a broken pipe is
# click's own business: it exits quietly).
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF})


def _cannot_write(error: OSError) -> NoReturn:
    """Say in one line that standard output cannot be written; exit 1."""
    reason = error.strerror or type(error).__name__
    click.echo(f"lbc: cannot write output: {reason}", err=True)
    _discard_stdout()
    sys.exit(1)


def _flush() -> None:
    try:
        sys.stdout.flush()
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise
        raise _OutputError(exc) from None


def _discard_stdout() -> None:
    # What could not be written is still buffered, and the interpreter flushes
    # standard output once more on its way out, which would fail with a traceback-like
    # "Exception ignored" report: let that last flush go to /dev/null instead.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fd = sys.stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
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
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write to this file instead of standard output ('-': standard output).",
)
def compile_cmd(file: Path, backend: str, fmt: str, output: str | None) -> None:
    """Compile FILE (cluster.toml) with a backend; no root and no kernel needed."""
    try:
        chosen = resolve(backend)
    except LbcError as exc:
        _fail(exc)
    # A format the backend does not offer is a mistake in the command, not in FILE:
    # say so before FILE is read, as click does for its own options.
    fmt = _format_of(chosen, fmt)
    try:
        artifact = api.compile(load(file), backend=chosen)
        text = artifact.text(fmt)
    except LbcError as exc:
        _fail(exc)
    if output is None or output == "-":
        _echo(text, nl=False)
        return
    try:
        _write_file(Path(output), text)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        click.echo(f"lbc: cannot write {output}: {reason}", err=True)
        sys.exit(EXIT_CONFIG)


def _format_of(backend: Backend, fmt: str) -> str:
    """The backend's name for output format `fmt` (any case), or a usage error."""
    try:
        # A backend's formats are the keys of its artifact, whatever the program (the
        # formats are printed only on use): those of an empty cluster's artifact.
        empty = lower(Cluster(node=Node(name="lbc")))
        offered = list(backend.render(empty).formats)
    except Exception:  # a plugin that cannot render an empty cluster: let compile tell
        return fmt
    by_case = {name.lower(): name for name in offered}
    if fmt.lower() in by_case:
        return by_case[fmt.lower()]
    raise click.BadParameter(
        f"{quote(fmt)} is not one of {', '.join(sorted(offered))} "
        f"(the formats of backend {backend.name!r})",
        param_hint="'-f' / '--format'",
    )


def _write_file(output: Path, text: str) -> None:
    """Write `text` to `output` whole or not at all: a temporary file renamed over it.

    The temporary file is made beside the file it replaces, under a name of its own
    (two runs never share one, and a long `output` name leaves room for it), and is
    removed on any failure. A symlink is followed: its target is replaced and the link
    stays a link. The file keeps its permissions, or gets the umask's for a new one
    (mkstemp's own are 0600). Anything but a regular file (a device such as /dev/null
    or /dev/stdout's terminal, a FIFO) is written in place, never replaced.
    """
    target = Path(os.path.realpath(output))
    try:
        st = os.stat(output)  # through links, /dev/stdout's too (its target has no name)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    else:
        if not stat.S_ISREG(st.st_mode):
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
            return
        mode = stat.S_IMODE(st.st_mode)
    fd, tmp = tempfile.mkstemp(prefix=".lbc-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@main.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check_cmd(file: Path) -> None:
    """Validate FILE and report every problem in it (exit 2 if there is one)."""
    try:
        text = read(file)  # kept: the notes' lines are found in it
        cluster = loads(text, filename=str(file))
    except LbcError as exc:
        _fail(exc)
    n = len(cluster.services)
    _echo(f"{file}: ok ({n} service{'' if n == 1 else 's'})")
    for problem in notes(cluster, str(file), text.removeprefix("\ufeff")):
        where = problem.file if problem.line is None else f"{problem.file}:{problem.line}"
        _echo(f"  note: {where}: {problem.path}: {problem.message}")


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of cluster.toml."""
    schema = Cluster.model_json_schema()
    _echo(json.dumps(schema, indent=2, sort_keys=True))


@main.command("backends")
def backends_cmd() -> None:
    """List every backend (built-in and plugins) with its capabilities."""
    try:
        found = api.backends()
    except LbcError as exc:
        _fail(exc)
    width = max(len(name) for name in found)
    for name, backend in found.items():
        _echo(f"{name:<{width}}  {backend.description}")
        features = ", ".join(sorted(backend.features)) or "-"
        schedulers = ", ".join(sorted(backend.schedulers))
        _echo(f"{'':<{width}}  features: {features}")
        _echo(f"{'':<{width}}  schedulers: {schedulers}")


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
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--to'") from None
    try:
        src = _ip(source)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--from'") from None
    if src.version != address.version:
        raise click.UsageError(
            f"source and destination are different IP families "
            f"(--from is IPv{src.version}, --to is IPv{address.version})"
        )
    try:
        program = lower(load(file))
    except LbcError as exc:
        _fail(exc)
    result = trace(
        program, str(src), str(address), port, proto.lower(), Origin(origin) if origin else None
    )
    for step in result.steps:
        _echo(step)
    _echo(f"verdict: {result.verdict}")


def _split_hostport(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """`10.0.0.1:80` or `[fd00::1]:80` as its address and port."""
    host, sep, port = text.rpartition(":")
    # ASCII digits only: str.isdigit() and int() also take other scripts' digits.
    if not sep or not port or not (port.isascii() and port.isdigit()):
        raise ValueError(f"{quote(text)} is not ADDRESS:PORT (or [IPv6-ADDRESS]:PORT)")
    bracketed = host.startswith("[") and host.endswith("]")
    if not bracketed and ":" in host:
        # `fd00::1:80` is itself an IPv6 address: only brackets make the port certain.
        try:
            example = f": [{ipaddress.IPv6Address(host)}]:{port}"
        except ValueError:
            example = ", such as [fd00::1]:80"
        raise ValueError(f"write an IPv6 address in brackets, then its port{example}")
    address = _ip(host[1:-1] if bracketed else host)
    if address.version == 4 and bracketed:
        raise ValueError(f"brackets are for IPv6 addresses: write {host[1:-1]}:{port}")
    number = port.lstrip("0")
    if len(number) > 5 or not 1 <= int(number or "0") <= 65535:
        shown = port if len(port) <= 10 else port[:7] + "..."
        raise ValueError(f"port {shown} of {quote(text)} is out of range 1-65535")
    return address, int(number)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{quote(text)} is not an IPv4 or IPv6 address") from None
    if "%" in text:  # `fe80::1%eth0`: rules know no zones, as cluster.toml does not
        raise ValueError(f"{quote(text)}: an IPv6 zone id is not allowed here")
    return address


_ACTION_STYLE = {
    Action.ADD: ("+", "green"),
    Action.CHANGE: ("~", "yellow"),
    Action.REMOVE: ("-", "red"),
}


def _show_plan(plan: Plan, fmt: str) -> None:
    if fmt == "json":
        _echo(json.dumps(plan.to_json(), indent=2, sort_keys=True))
        return
    for change in plan.changes:
        mark, colour = _ACTION_STYLE[change.action]
        _echo(f"{mark} {change.action} {change.key}", fg=colour, bold=True)
        for line in change.diff():
            fg = "green" if line.startswith("+") else "red" if line.startswith("-") else None
            _echo(f"    {line}", fg=fg)
    _echo(f"{plan.backend}: {plan.summary()}")


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


_keep_udp_flows = click.option(
    "--keep-udp-flows",
    is_flag=True,
    help="Leave conntrack entries of UDP flows to gone endpoints in place (default: delete them).",
)


@main.command("plan")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_kernel_options
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(["text", "json"], case_sensitive=False),
    default="text",
)
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
@_keep_udp_flows
def apply_cmd(
    file: Path,
    backend: str,
    netns: str | None,
    lock_file: Path,
    lock_timeout: float,
    dry_run: bool,
    full: bool,
    progress: bool | None,
    keep_udp_flows: bool,
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
            clear_stale_udp=not keep_udp_flows,
        )
    except LbcError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted()
    if dry_run:
        _show_plan(result.plan, "text")
    for warning in result.warnings:
        click.echo(f"lbc: warning: {warning}", err=True)
    _echo(result.summary())


@main.command("watch")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_kernel_options
@_lock_options
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds between looks at FILE.",
)
@click.option(
    "--resync",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds between re-applies of the version in force, which repair what another "
    "writer changed (0: never).",
)
@_keep_udp_flows
def watch_cmd(
    file: Path,
    backend: str,
    netns: str | None,
    lock_file: Path,
    lock_timeout: float,
    interval: float,
    resync: float,
    keep_udp_flows: bool,
) -> None:
    """Apply FILE whenever it changes, each time only what changed (root).

    A version that is invalid or cannot be applied is reported on stderr and the rules
    of the last one applied stay in force. Runs until SIGTERM or SIGINT; the rules stay
    in force after it stops (`lbc delete` removes them).
    """
    stop = threading.Event()
    try:
        session = Session(
            backend,
            netns=netns,
            lock_path=lock_file,
            lock_timeout=lock_timeout,
            clear_stale_udp=not keep_udp_flows,
            cancel=stop,  # a stop ends a wait for another apply's lock at once
        )
    except LbcError as exc:
        _fail(exc)

    def finish(signum: int, frame: object) -> None:
        # From another thread: the handler runs in the main thread, which may be inside
        # `stop.wait()` holding the event's (non-reentrant) lock.
        threading.Thread(target=stop.set).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, finish)

    def report(event: Event) -> None:
        if event.outcome in (Outcome.APPLIED, Outcome.REPAIRED):
            _echo(f"{file}: {event.message}")
            _flush()
            assert event.result is not None
            for warning in event.result.warnings:
                click.echo(f"lbc: warning: {warning}", err=True)
        else:
            click.echo(f"lbc: {event.message}", err=True)

    click.echo(f"lbc: watching {file} ({session.backend.name}); SIGTERM or ^C stops", err=True)
    watch(file, session, report, interval=interval, resync=resync, stop=stop)
    click.echo("lbc: stopped; the rules applied stay in force", err=True)


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
        _echo(f"{backend}: kernel matches {file}")
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
    except KeyboardInterrupt:
        _interrupted()
    if dry_run:
        _show_plan(result.plan, "text")
    _echo(result.summary())


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
        _echo(line, fg=fg)
    sys.exit(EXIT_PENDING if text else 0)
