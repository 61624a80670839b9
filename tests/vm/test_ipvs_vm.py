"""The IPVS suite: boots a Debian kernel under QEMU with vng and runs the guest suites in it.

This machine's kernel may lack IPVS and dummy interfaces; the guest kernel has both.
The guest sees the host's filesystem read-only, so results come back through a
`--rwdir` directory: pytest's junit XML, its output and its exit status. The guest
boots once for the module; each test here checks its own suites' results.
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
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.golden import ROOT
from tests.vm.guest_ipvs_flows import IDS, ROWS, refusal

pytestmark = pytest.mark.vm

MODULES = "ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sh ip_vs_mh dummy veth"
# Everything runs in one boot: the dataplane from operations, lbc apply on it, then the
# packet-flow matrix through lbc apply.
FLOW_SUITE = "guest_ipvs_flows.py"
GUEST_SUITES = ("guest_ipvs.py", "guest_ipvs_apply.py", FLOW_SUITE)
# Rows of the matrix that must run on IPVS: all but those of the golden cases the
# backend refuses (external traffic policy Local, node ports on localhost).
MIN_FLOW_ROWS = 40
BOOT_TIMEOUT = 900  # seconds for boot and the whole guest run, under software emulation


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


@dataclass(frozen=True)
class Case:
    """One test of the guest run, as its junit XML records it."""

    suite: str  # the guest file, e.g. "guest_ipvs.py"
    name: str
    outcome: str  # passed, failed, error or skipped
    message: str


@dataclass(frozen=True)
class GuestRun:
    """What one boot of the guest reported: every test, the log and the exit statuses."""

    cases: tuple[Case, ...]
    log: str
    status: int
    vng_status: int
    console: str

    def of(self, *suites: str) -> list[Case]:
        return [c for c in self.cases if c.suite in suites]

    def check(self, *suites: str) -> list[Case]:
        """The tests of `suites`; fail on any failure among them or a run that broke."""
        cases = self.of(*suites)
        bad = [c for c in cases if c.outcome in ("failed", "error")]
        if bad:
            names = "\n".join(f"  {c.outcome}: {c.name}" for c in bad)
            pytest.fail(f"the guest suite failed (exit {self.status}):\n{names}\n{self.log}")
        if self.status != 0 and not [c for c in self.cases if c.outcome in ("failed", "error")]:
            pytest.fail(f"the guest run exited {self.status} without a failing test:\n{self.log}")
        assert self.vng_status == 0, _tail(self.console)
        return cases


def read_junit(path: Path) -> tuple[Case, ...]:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    cases = []
    for case in suite.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = found.get("message", "")
                break
        module = case.get("classname", "").rsplit(".", 1)[-1]
        cases.append(Case(f"{module}.py", case.get("name", ""), outcome, message))
    return tuple(cases)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    """Boot the guest once and run every guest suite in it."""
    lacks = missing()
    if lacks:
        reason = "the IPVS VM suite needs " + "; ".join(lacks) + " (scripts/test.sh installs them)"
        if os.environ.get("LBC_VM_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    image = kernel()
    assert image is not None
    results = tmp_path_factory.mktemp("guest")
    argv = [
        str(vng()),
        "--run",
        str(image),
        "--disable-kvm",  # a stock kernel does not boot under this machine's KVM
        "--memory",
        "1G",
        f"--rwdir={results}",
        "--exec",
        guest_command(results),
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

    log_file, status_file, junit_file = (results / n for n in ("guest.log", "status", "junit.xml"))
    log = log_file.read_text() if log_file.exists() else "(no guest output)"
    if not status_file.exists() or not junit_file.exists():
        pytest.fail(f"the guest suite did not run (vng exit {proc.returncode}):\n{_tail(console)}")
    return GuestRun(
        read_junit(junit_file), log, int(status_file.read_text()), proc.returncode, console
    )


def test_ipvs_in_a_vm(guest: GuestRun) -> None:
    cases = guest.check("guest_ipvs.py", "guest_ipvs_apply.py")
    assert len(cases) >= 25, guest.log
    skipped = [c.name for c in cases if c.outcome == "skipped"]
    assert not skipped, f"nothing may skip inside the VM: {skipped}\n{guest.log}"


def test_the_flow_matrix_on_ipvs(guest: GuestRun) -> None:
    """Every row of tests/flows.py ran through IPVS unless the backend refuses its case.

    A row may skip only with the refusal the IPVS backend's own check gives for its
    golden case (computed here again); every other row must have passed.
    """
    cases = {c.name: c for c in guest.check(FLOW_SUITE)}
    rows = {f"test_flow_on_ipvs[{row_id}]": row for row_id, row in zip(IDS, ROWS, strict=True)}
    assert set(rows) <= set(cases), f"rows missing from the guest run:\n{guest.log}"
    ran = [name for name in rows if cases[name].outcome == "passed"]
    for name, row in rows.items():
        refused = refusal(row.case)
        if refused is None:
            assert cases[name].outcome == "passed", f"{name}: {cases[name]}"
        else:
            assert (cases[name].outcome, cases[name].message) == ("skipped", refused), name
    others = [c for name, c in cases.items() if name not in rows]
    assert others and all(c.outcome == "passed" for c in others), others
    print(f"\n  flow matrix on ipvs: {len(ran)} of {len(rows)} rows ran")
    assert len(ran) >= MIN_FLOW_ROWS, f"only {len(ran)} rows ran on IPVS:\n{guest.log}"


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])
