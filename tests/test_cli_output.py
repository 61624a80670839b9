"""Where `lbc` writes: standard output that fails, `-o` files written whole or not at
all, output formats checked as options, and the `check` summary."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomli
from click.testing import CliRunner

from lbc.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hostnames.toml"
MANY = ROOT / "golden" / "many-services" / "cluster.toml"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def lbc_process(
    *args: str, stdout: int, limit_file_size: int | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`lbc ARGS` in a fresh interpreter, with its standard output on `stdout`."""

    def limit() -> None:  # in the child, before exec: writes past the limit fail (EFBIG)
        if limit_file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an ignored signal stays so
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run(
        [sys.executable, "-c", "from lbc.cli import main; main()", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=limit,
        cwd=cwd,
    )


# --- standard output that cannot be written --------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "args",
    [
        ("check", str(EXAMPLE)),
        ("compile", str(EXAMPLE), "-b", "nftables"),
        ("compile", str(MANY), "-b", "iptables"),  # more than one buffer's worth
        ("schema",),
        ("--help",),  # printed while the command line is parsed, before any command
        ("--version",),
        ("compile", "--help"),
    ],
    ids=["check", "compile", "compile-large", "schema", "help", "version", "command-help"],
)
def test_a_full_disk_on_stdout_is_one_line_not_a_traceback(args: tuple[str, ...]) -> None:
    with open("/dev/full", "w") as full:
        proc = lbc_process(*args, stdout=full.fileno())
    assert proc.returncode == 1
    assert proc.stderr == "lbc: cannot write output: No space left on device\n"


def test_a_closed_pipe_on_stdout_still_exits_quietly() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before lbc writes
    try:
        proc = lbc_process("compile", str(MANY), "-b", "iptables", stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 1
    assert proc.stderr == ""


# --- -o OUT ----------------------------------------------------------------------


def test_a_failed_write_leaves_no_temporary_file_and_keeps_the_old_output(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.rules"
    out.write_text("previous rules\n", encoding="utf-8")
    # A real failure in the middle of writing: the file size limit stops the write.
    proc = lbc_process(
        "compile",
        str(MANY),
        "-b",
        "iptables",
        "-o",
        str(out),
        stdout=subprocess.DEVNULL,
        limit_file_size=4096,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"lbc: cannot write {out}: File too large\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rules"]
    assert out.read_text(encoding="utf-8") == "previous rules\n"


def test_another_file_named_like_the_old_temporary_one_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out.rules"
    other = tmp_path / "out.rules.tmp"  # someone else's file, or another run's
    other.write_text("not lbc's\n", encoding="utf-8")
    code, _, stderr = run("compile", str(EXAMPLE), "-o", str(out))
    assert (code, stderr) == (0, "")
    assert other.read_text(encoding="utf-8") == "not lbc's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rules", "out.rules.tmp"]


def test_an_output_name_of_253_characters_is_written(tmp_path: Path) -> None:
    out = tmp_path / ("r" * 253)  # leaves no room for a ".tmp" suffix within NAME_MAX
    code, stdout, stderr = run("compile", str(EXAMPLE), "-o", str(out))
    assert (code, stdout, stderr) == (0, "", "")
    assert out.read_text(encoding="utf-8") == run("compile", str(EXAMPLE))[1]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_dash_is_standard_output(tmp_path: Path) -> None:
    _, expected, _ = run("compile", str(EXAMPLE), "-b", "nftables")
    proc = lbc_process(
        "compile", str(EXAMPLE), "-b", "nftables", "-o", "-", stdout=subprocess.PIPE, cwd=tmp_path
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == expected
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_a_symlink_keeps_pointing_at_its_target_which_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "rules" / "node-1.rules"
    target.parent.mkdir()
    target.write_text("old\n", encoding="utf-8")
    link = tmp_path / "current.rules"
    link.symlink_to(Path("rules") / "node-1.rules")
    code, _, stderr = run("compile", str(EXAMPLE), "-b", "nftables", "-o", str(link))
    assert (code, stderr) == (0, "")
    assert link.is_symlink()
    assert os.readlink(link) == str(Path("rules") / "node-1.rules")
    assert target.read_text(encoding="utf-8").startswith("# lbc nftables ruleset")
    assert sorted(p.name for p in target.parent.iterdir()) == ["node-1.rules"]


def test_the_output_file_keeps_its_permissions(tmp_path: Path) -> None:
    out = tmp_path / "out.rules"
    out.write_text("old\n", encoding="utf-8")
    out.chmod(0o640)
    code, _, _ = run("compile", str(EXAMPLE), "-o", str(out))
    assert code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    fresh = tmp_path / "fresh.rules"
    umask = os.umask(0o022)
    try:
        assert run("compile", str(EXAMPLE), "-o", str(fresh))[0] == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600


# --- output formats ----------------------------------------------------------------


def test_a_format_the_backend_lacks_is_a_usage_error_before_the_file_is_read(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "absent.toml"
    code, stdout, stderr = run("compile", str(missing), "-b", "iptables", "-f", "json")
    assert (code, stdout) == (2, "")
    assert (
        "Invalid value for '-f' / '--format': 'json' is not one of text "
        "(the formats of backend 'iptables')"
    ) in stderr
    assert "cannot read file" not in stderr  # the file was not looked at
    # ... and a real file gets the same answer, not exit 3 "cannot express".
    assert run("compile", str(EXAMPLE), "-b", "iptables", "-f", "json")[0] == 2


@pytest.mark.parametrize("spelling", ["JSON", "Json"])
def test_formats_are_case_insensitive(spelling: str) -> None:
    code, stdout, stderr = run("compile", str(EXAMPLE), "-b", "nftables", "-f", spelling)
    assert (code, stderr) == (0, "")
    assert stdout == run("compile", str(EXAMPLE), "-b", "nftables", "-f", "json")[1]
    assert stdout.startswith("{")


# --- lbc check ---------------------------------------------------------------------


def test_check_counts_services_in_words() -> None:
    assert run("check", str(EXAMPLE))[1] == f"{EXAMPLE}: ok (1 service)\n"
    count = len(tomli.loads(MANY.read_text(encoding="utf-8"))["services"])
    assert count > 1
    assert run("check", str(MANY))[1] == f"{MANY}: ok ({count} services)\n"


def test_a_fifo_is_written_in_place_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "rules.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    try:
        code, _, stderr = run("compile", str(EXAMPLE), "-o", str(fifo))
        received, _ = reader.communicate(timeout=10)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert (code, stderr) == (0, "")
    assert received == run("compile", str(EXAMPLE))[1]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["rules.fifo"]


def test_a_device_is_written_in_place_not_replaced(tmp_path: Path) -> None:
    device = tmp_path / "null"  # a node of /dev/null's device, so no real one is at risk
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    code, _, stderr = run("compile", str(EXAMPLE), "-o", str(device))
    assert (code, stderr) == (0, "")
    assert stat.S_ISCHR(device.lstat().st_mode)
    assert os.major(device.lstat().st_rdev) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["null"]


def test_dev_stdout_on_a_pipe_is_standard_output() -> None:
    _, expected, _ = run("compile", str(EXAMPLE))
    proc = lbc_process("compile", str(EXAMPLE), "-o", "/dev/stdout", stdout=subprocess.PIPE)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == expected
