"""`lbc watch` as a process, on this machine's kernel in network namespaces: the seed's
client reaches the pods of each version of the file, a broken version changes nothing,
a resync repairs another writer's deletion, and SIGTERM stops it with the rules kept."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lbc
from lbc.apply import host_lock
from tests import netns

pytestmark = pytest.mark.netns

VIP = "10.0.1.175"
PODS = {"hostnames-0uton": "10.244.3.6", "hostnames-yp2kp": "10.244.1.7"}
NODE = """[node]
name = "node-1"
addresses = ["192.168.49.2"]
pod_cidrs = ["10.244.0.0/16"]

[[services]]
namespace = "default"
name = "hostnames"
cluster_ips = ["10.0.1.175"]
ports = [{ port = 80, target_port = 9376 }]
"""
WAIT = 30.0  # seconds for one report of the process


def config(*pods: str) -> str:
    endpoints = "".join(f'\n[[services.endpoints]]\nip = "{PODS[p]}"\n' for p in pods)
    return NODE + endpoints


def replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


class Watcher:
    """`lbc watch` running in the node's namespace; its output lines, as they come."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lbc", "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, text: str) -> str:
        """The next line holding `text` (earlier lines are kept in `seen`)."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no line with {text!r}; saw {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(WAIT)
        finally:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def seed() -> Iterator[netns.Seed]:
    netns.require("nft")
    with netns.seed_topology(pods=PODS, pods6={}) as topology:
        yield topology


def test_watch_follows_the_file_and_keeps_the_rules_when_stopped(
    seed: netns.Seed, tmp_path: Path
) -> None:
    path = tmp_path / "cluster.toml"
    lock = tmp_path / "lock"
    replace(path, config("hostnames-0uton"))
    options = {"-b": "nftables", "--netns": seed.node.name, "--lock-file": str(lock)}
    options |= {"--interval": "0.05", "--resync": "0.5"}
    watcher = Watcher([str(path), *(word for pair in options.items() for word in pair)])
    try:
        watcher.expect("watching")
        watcher.expect("nftables: applied")
        assert set(seed.client.request(VIP, 80, count=20).names) == {"hostnames-0uton"}

        replace(path, config("hostnames-0uton", "hostnames-yp2kp"))
        line = watcher.expect("nftables: applied")
        assert "0 removed" in line
        assert set(seed.client.request(VIP, 80, count=40).names) == set(PODS)

        replace(path, config("hostnames-yp2kp").replace("port = 80", "port = 70000"))
        watcher.expect("port 70000 is out of range 1-65535")
        watcher.expect("stay in force")
        assert set(seed.client.request(VIP, 80, count=40).names) == set(PODS)

        seed.node.exec("nft", "flush", "map", "inet", "lbc", "service-ips4")  # another writer
        watcher.expect("resync: nftables: applied: 0 added, 1 changed")
        assert set(seed.client.request(VIP, 80, count=40).names) == set(PODS)

        assert watcher.stop() == 0
        assert "stopped; the rules applied stay in force" in watcher.expect("stopped")
        cluster = lbc.loads(config("hostnames-0uton", "hostnames-yp2kp"))
        assert lbc.verify(cluster, "nftables", netns=seed.node.name).in_sync
    finally:
        watcher.stop()
        lbc.delete("nftables", netns=seed.node.name, lock_path=lock)


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_namespace_deleted_and_made_again_gets_the_rules_at_the_next_resync(
    backend: str, tmp_path: Path
) -> None:
    netns.require("iptables", "nft")
    path = tmp_path / "cluster.toml"
    lock = tmp_path / "lock"
    replace(path, config("hostnames-0uton"))
    cluster = lbc.loads(config("hostnames-0uton"))
    with netns.Lab() as lab:
        node = lab.namespace("node")
        options = {"-b": backend, "--netns": node.name, "--lock-file": str(lock)}
        options |= {"--interval": "0.05", "--resync": "0.3"}
        watcher = Watcher([str(path), *(word for pair in options.items() for word in pair)])
        try:
            watcher.expect(f"{backend}: applied")
            netns.run(["ip", "netns", "del", node.name])
            netns.run(["ip", "netns", "add", node.name])  # the same name, a new namespace
            watcher.expect(f"resync: {backend}: applied")
            assert lbc.verify(cluster, backend, netns=node.name).in_sync
            assert watcher.stop() == 0
        finally:
            watcher.stop()


def test_sigterm_while_another_apply_holds_the_lock_stops_at_once(
    seed: netns.Seed, tmp_path: Path
) -> None:
    """The first apply waits for a lock this test holds; SIGTERM ends the command within
    moments (not after `--lock-timeout`), exit status 0, nothing written."""
    path = tmp_path / "cluster.toml"
    lock = tmp_path / "lock"
    replace(path, config("hostnames-0uton"))
    options = {"-b": "nftables", "--netns": seed.node.name, "--lock-file": str(lock)}
    options |= {"--interval": "0.05", "--lock-timeout": "120"}
    with host_lock(lock):
        watcher = Watcher([str(path), *(word for pair in options.items() for word in pair)])
        try:
            watcher.expect("watching")
            time.sleep(0.5)  # the first apply is waiting for the lock
            started = time.monotonic()
            assert watcher.stop() == 0
            assert time.monotonic() - started < 10
            assert "stopped while waiting for" in watcher.expect("stopped while waiting")
            watcher.expect("stopped; the rules applied stay in force")
        finally:
            watcher.stop()
    assert "inet lbc" not in seed.node.exec("nft", "list", "tables")
