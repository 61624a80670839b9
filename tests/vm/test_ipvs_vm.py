"""The IPVS suite: boots a Debian kernel under QEMU with vng and runs the guest suites in it.

This machine's kernel may lack IPVS and dummy interfaces; the guest kernel has both.
The guest sees the host's filesystem read-only, so results come back through a
`--rwdir` directory: pytest's junit XML, its output and its exit status.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.golden import ROOT

pytestmark = pytest.mark.vm

MODULES = "ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sh ip_vs_mh dummy veth"
# Everything runs in one boot: the dataplane from operations, then lbc apply on it.
GUEST_SUITES = ("guest_ipvs.py", "guest_ipvs_apply.py")
BOOT_TIMEOUT = 600  # seconds for boot and the whole guest run, under software emulation


def kernel() -> Path | None:
    """The newest generic Debian kernel in /boot (linux-image-amd64), if any."""

    def version(path: Path) -> list[int]:
        return [int(part) for part in re.findall(r"\d+", path.name)]

    found = [p for p in Path("/boot").glob("vmlinuz-*-amd64") if "cloud" not in p.name]
    return max(found, key=version) if found else None


def vng() -> str | None:
    """vng from this interpreter's environment (the test extra), else from PATH."""
    beside = Path(sys.executable).parent / "vng"
    return str(beside) if beside.exists() else shutil.which("vng")


def missing() -> list[str]:
    """What the suite needs and this machine lacks."""
    image = kernel()
    lacks = []
    if vng() is None:
        lacks.append("vng (pip: virtme-ng, in the test extra)")
    if shutil.which("qemu-system-x86_64") is None:
        lacks.append("qemu-system-x86_64 (apt: qemu-system-x86)")
    if image is None:
        lacks.append("a kernel /boot/vmlinuz-*-amd64 (apt: linux-image-amd64)")
    elif not Path("/lib/modules", image.name.removeprefix("vmlinuz-")).is_dir():
        lacks.append(f"the modules of {image.name} (apt: linux-image-amd64)")
    if shutil.which("busybox") is None:
        lacks.append("a static busybox for vng's initramfs (apt: busybox-static)")
    if os.geteuid() != 0:
        lacks.append("root (vng runs the guest as the calling user; IPVS needs root)")
    return lacks


def guest_command(results: Path) -> str:
    """The guest's shell command: load modules, run the guest suite, keep its status."""
    out = shlex.quote(str(results))
    pytest_argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rA",
        "--durations=8",
        f"--junitxml={results / 'junit.xml'}",
        *(str(ROOT / "tests" / "vm" / name) for name in GUEST_SUITES),
    ]
    return (
        f"modprobe -a {MODULES} && cd {shlex.quote(str(ROOT))} && "
        f"LBC_VM_GUEST=1 PYTHONDONTWRITEBYTECODE=1 {shlex.join(pytest_argv)} "
        f"> {out}/guest.log 2>&1; status=$?; echo $status > {out}/status; exit $status"
    )


def test_ipvs_in_a_vm(tmp_path: Path) -> None:
    lacks = missing()
    if lacks:
        reason = "the IPVS VM suite needs " + "; ".join(lacks) + " (scripts/test.sh installs them)"
        if os.environ.get("LBC_VM_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    image = kernel()
    assert image is not None
    argv = [
        str(vng()),
        "--run",
        str(image),
        "--disable-kvm",  # a stock kernel does not boot under this machine's KVM
        "--memory",
        "1G",
        f"--rwdir={tmp_path}",
        "--exec",
        guest_command(tmp_path),
    ]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # so that QEMU goes too if the guest hangs
    )
    try:
        console, _ = proc.communicate(timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        console, _ = proc.communicate()
        pytest.fail(f"the VM did not finish in {BOOT_TIMEOUT}s:\n{_tail(console)}")

    log_file, status_file, junit_file = (tmp_path / n for n in ("guest.log", "status", "junit.xml"))
    log = log_file.read_text() if log_file.exists() else "(no guest output)"
    if not status_file.exists() or not junit_file.exists():
        pytest.fail(f"the guest suite did not run (vng exit {proc.returncode}):\n{_tail(console)}")
    status = int(status_file.read_text())
    suite = ET.parse(junit_file).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    if status != 0 or counts["failures"] or counts["errors"]:
        pytest.fail(f"the guest suite failed (exit {status}, {counts}):\n{log}")
    assert counts["tests"] >= 25, log
    assert counts["skipped"] == 0, f"nothing may skip inside the VM:\n{log}"
    assert proc.returncode == 0, _tail(console)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])
