"""`lbc apply` killed with SIGTERM in the middle of its commit, in a network namespace.

Both commits here are several kernel writes: iptables restores each family's tables,
then (for a large first apply) inserts its jumps in a second restore; nftables loads
a large table in netlink batches after a libnftables skeleton. A SIGTERM as the commit
starts must end the process only once the commit is whole (`lbc.apply.shield`): the
namespace then holds the whole config, which `lbc verify` confirms, not half of it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import lbc
from bench.gen import generate
from tests import netns

pytestmark = pytest.mark.netns

TOOLS = ("iptables", "iptables-save", "iptables-restore", "ip6tables-save", "nft")
# Large enough that the commit takes a while after it starts (iptables: 800 services
# restore in two parts; nftables: a load in several netlink batches).
SIZES = {"iptables": (800, 2), "nftables": (6000, 10)}
COMMAND_TIMEOUT = 120.0


@pytest.mark.parametrize("backend", sorted(SIZES))
def test_sigterm_as_the_commit_starts_leaves_the_whole_config_applied(
    backend: str, tmp_path: Path
) -> None:
    netns.require(*TOOLS)
    services, endpoints = SIZES[backend]
    config = tmp_path / "cluster.toml"
    config.write_text(generate(services, endpoints, seed=3)[0])
    lock = tmp_path / "lock"
    with netns.Lab() as lab:
        ns = lab.namespace("node")
        command = [sys.executable, "-m", "lbc", "apply", str(config), "-b", backend]
        process = subprocess.Popen(
            [*command, "--netns", ns.name, "--lock-file", str(lock), "--progress"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lab.processes.append(process)
        assert process.stderr is not None
        phases = []
        for line in process.stderr:
            phases.append(line)
            if " committing: " in line:
                process.send_signal(signal.SIGTERM)
                break
        out, err = process.communicate(timeout=COMMAND_TIMEOUT)
        assert any(" committing: " in line for line in phases), "".join(phases) + err
        assert process.returncode == -signal.SIGTERM, "".join(phases) + err
        # It ended by the signal (no summary printed), after the commit and its check.
        assert out == ""
        drift = lbc.verify(lbc.load(config), backend, netns=ns.name)
        assert drift.in_sync, drift.summary()
        lbc.delete(backend, netns=ns.name, lock_path=lock)
