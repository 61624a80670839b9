"""A one-endpoint change to one of 100 services is a few-line diff that names only that service."""

from __future__ import annotations

import difflib
import re

import pytest

import lbc

SERVICES = 100
CHAIN = re.compile(r"LBC-[A-Z]+-[A-Z2-7]{16}")
NEW_ENDPOINT = "10.244.9.{i}"


def cluster(extra_for: int | None = None) -> str:
    """cluster.toml with 100 services of 1-4 endpoints; `extra_for` gets one endpoint more."""
    out = ['[node]\nname = "node-1"\npod_cidrs = ["10.244.0.0/16"]\n']
    for i in range(SERVICES):
        ips = [f"10.244.{k + 1}.{i + 10}" for k in range(i % 4 + 1)]
        if i == extra_for:
            ips.append(NEW_ENDPOINT.format(i=i + 10))
        endpoints = ", ".join(f'{{ ip = "{ip}" }}' for ip in ips)
        out.append(
            f'[[services]]\nnamespace = "{("default", "shop")[i % 2]}"\nname = "svc-{i:03d}"\n'
            f'cluster_ips = ["10.0.3.{i + 1}"]\n'
            f'ports = [{{ name = "http", port = 80, target_port = {8000 + i} }}]\n'
            f"endpoints = [{endpoints}]\n"
        )
    return "\n".join(out)


def spn(i: int) -> str:
    """The readable name of service i's port, as comments and the IR print it."""
    return f"{('default', 'shop')[i % 2]}/svc-{i:03d}:http"


def render(backend: str, extra_for: int | None = None) -> list[str]:
    """The artifact's lines."""
    return lbc.compile(lbc.loads(cluster(extra_for)), backend=backend).text().splitlines()


def changed(before: list[str], after: list[str]) -> tuple[list[str], list[str]]:
    """(removed lines, added lines) of the unified diff."""
    diff = list(difflib.unified_diff(before, after, lineterm="", n=0))[2:]
    removed = [d[1:] for d in diff if d.startswith("-")]
    added = [d[1:] for d in diff if d.startswith("+")]
    return removed, added


# Services with 1, 2, 3 and 4 endpoints, first and last in canonical order among them.
@pytest.mark.parametrize("i", [56, 57, 58, 59, 0, 99])
def test_iptables_diff_touches_only_the_changed_service(i: int) -> None:
    before, after = render("iptables"), render("iptables", extra_for=i)
    removed, added = changed(before, after)
    name = spn(i)
    own = {c for line in before + after if name in line for c in CHAIN.findall(line)}
    print(f"\n  {name}: -{len(removed)} +{len(added)} lines, chains {sorted(own)}")
    for line in removed + added:
        assert name in line or any(c in line for c in own), f"unrelated change: {line}"
    existing = i % 4 + 1
    # A new endpoint chain (declaration, mark rule, DNAT rule) and its pool rule, plus
    # the pool rules whose probabilities move: at most every existing one.
    assert len(added) >= 4
    assert len(removed) + len(added) <= 2 * existing + 4
    if existing == 1:
        assert len(removed) + len(added) <= 6
    new = [line for line in added if NEW_ENDPOINT.format(i=i + 10) in line]
    assert len(new) == 3, new  # pool rule, mark rule, DNAT rule


@pytest.mark.parametrize("i", [56, 57, 0, 99])
def test_ir_diff_is_one_line_in_the_changed_service(i: int) -> None:
    before, after = render("ir"), render("ir", extra_for=i)
    removed, added = changed(before, after)
    assert removed == []
    assert len(added) == 1 and NEW_ENDPOINT.format(i=i + 10) in added[0], added
    at = after.index(added[0])
    header = next(line for line in reversed(after[:at]) if line.startswith("service "))
    assert header.startswith(f"service {spn(i)} "), header
