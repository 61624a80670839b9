"""One input, every backend side by side (in the style of sqlglot's `validate_all`).

Each row is a small service and, for every built-in backend, a fragment its output
must contain, or `UnsupportedError` where the backend must refuse. A new backend
appears here as a new column; a row without it fails.
"""

from __future__ import annotations

from typing import TypeAlias

import pytest

import lbc
from tests.golden import builtin_backends

Expected: TypeAlias = str | type[lbc.UnsupportedError]

NODE = """
[node]
name = "node-1"
addresses = ["192.168.49.2"]
pod_cidrs = ["10.244.0.0/16"]
"""


def service(
    extra: str = "", endpoints: str = '{ ip = "10.244.1.7" }, { ip = "10.244.2.3" }'
) -> str:
    return (
        NODE
        + f"""
[[services]]
name = "t"
cluster_ips = ["10.0.0.10"]
ports = [{{ name = "p", port = 80, target_port = 8080 }}]
endpoints = [{endpoints}]
{extra}
"""
    )


ROWS: dict[str, tuple[str, dict[str, Expected]]] = {
    "equal weights": (
        service(),
        {
            "ir": "backend 10.244.2.3:8080 weight 1",
            "iptables": "--probability 0.50000000000 -j LBC-SEP-",
            "nftables": "numgen random mod 2 < 1 dnat ip to 10.244.1.7:8080",
            "ipvs": "-A -t 10.0.0.10:80 -s rr",
        },
    ),
    "weights 1:3": (
        service(endpoints='{ ip = "10.244.1.7", weight = 1 }, { ip = "10.244.2.3", weight = 3 }'),
        {
            "ir": "backend 10.244.2.3:8080 weight 3",
            "iptables": "--probability 0.25000000000 -j LBC-SEP-",
            "nftables": "numgen random mod 4 < 1 dnat ip to 10.244.1.7:8080",
            "ipvs": "-a -t 10.0.0.10:80 -r 10.244.2.3:8080 -m -w 3",
        },
    ),
    "round robin asked for": (
        service('scheduler = "rr"'),
        {
            "ir": "scheduler rr",
            "iptables": lbc.UnsupportedError,
            "nftables": lbc.UnsupportedError,
            "ipvs": "-A -t 10.0.0.10:80 -s rr",
        },
    ),
    "random asked for": (
        service('scheduler = "random"'),
        {
            "ir": "scheduler random",
            "iptables": "-m statistic --mode random",
            "nftables": "numgen random",
            "ipvs": lbc.UnsupportedError,
        },
    ),
    "maglev asked for": (
        service('scheduler = "mh"'),
        {
            "ir": "scheduler mh",
            "iptables": lbc.UnsupportedError,
            "nftables": lbc.UnsupportedError,
            "ipvs": "-A -t 10.0.0.10:80 -s mh",
        },
    ),
    "session affinity": (
        service('session_affinity = "ClientIP"\nsession_affinity_timeout = 60'),
        {
            "ir": "affinity client-ip 60s",
            "iptables": "-m recent --rcheck --seconds 60 --reap",
            "nftables": "timeout 1m",
            "ipvs": "-A -t 10.0.0.10:80 -s rr -p 60",
        },
    ),
    "no endpoints": (
        service(endpoints=""),
        {
            "ir": "(no backends)",
            "iptables": "has no endpoints",
            "nftables": "10.0.0.10 . tcp . 80 : goto reject-chain",
            "ipvs": "-A -t 10.0.0.10:80 -s rr",
        },
    ),
    "UDP port": (
        service().replace('name = "p", port = 80', 'name = "p", protocol = "UDP", port = 80'),
        {
            "ir": "service default/t:p udp ipv4",
            "iptables": '-p udp -m comment --comment "default/t:p" -m udp -j DNAT',
            "nftables": "meta l4proto udp numgen random mod 2 < 1 dnat ip to 10.244.1.7:8080",
            "ipvs": "-A -u 10.0.0.10:80 -s rr",
        },
    ),
}


def test_every_row_names_every_builtin_backend() -> None:
    for name, (_, expected) in ROWS.items():
        assert set(expected) == set(builtin_backends()), name


@pytest.mark.parametrize("row", sorted(ROWS))
def test_validate_all(row: str) -> None:
    text, expected = ROWS[row]
    cluster = lbc.loads(text)
    for backend, want in expected.items():
        if isinstance(want, str):
            out = lbc.compile(cluster, backend).text()
            assert want in out, f"{row}: {backend} output lacks {want!r}:\n{out}"
        else:
            with pytest.raises(want):
                lbc.compile(cluster, backend)
