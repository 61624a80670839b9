"""Reading nft's listing: protocols by number are the same objects as by name.

Without /etc/protocols (a minimal container), nft lists `meta l4proto 6` and
`inet_proto` elements as `10.0.1.187 . 17 . 53`; lbc writes names. The kernel adapter's
parser (`kernel.parse`) reads both as names, or `lbc verify -b nftables` would report
drift forever on such a host.
"""

from __future__ import annotations

import re

import pytest

from lbc.backends.nftables import kernel as nft_kernel
from tests import netns
from tests.golden import GOLDEN

NUMBERS = {"tcp": "6", "udp": "17", "sctp": "132"}
CASES = ["udp-sctp", "node-port", "dual-stack", "load-balancer"]

# A numeric listing as nft 1.0.6 prints it without /etc/protocols (udp-sctp, cut).
NUMERIC = (
    "table inet lbc {\n"
    "\tmap service-ips4 {\n"
    "\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n"
    "\t\telements = { 10.0.1.187 . 6 . 53 : goto service-6EWGEQEY-default/multi/tcp/dns-tcp,\n"
    "\t\t\t     10.0.1.187 . 17 . 53 : goto service-MCRAIUFW-default/multi/udp/dns-udp,\n"
    "\t\t\t     10.0.1.187 . 132 . 2905 : goto service-4WFMF3EO-default/multi/sctp/sig }\n"
    "\t}\n"
    "\n"
    "\tmap service-nodeports4 {\n"
    "\t\ttype inet_proto . inet_service : verdict\n"
    "\t\telements = { 6 . 30080 : goto external-NVW5WAKF-default/web/tcp/http }\n"
    "\t}\n"
    "\n"
    "\tchain service-MCRAIUFW-default/multi/udp/dns-udp {\n"
    "\t\tmeta l4proto 17 numgen random mod 2 < 1 dnat ip to 10.244.1.7:5353\n"
    "\t\tmeta l4proto 17 dnat ip to 10.244.2.3:5353\n"
    "\t}\n"
    "}\n"
    "\n"
)
NAMED = NUMERIC.replace(" . 6 . ", " . tcp . ").replace(" . 17 . ", " . udp . ")
NAMED = NAMED.replace(" . 132 . ", " . sctp . ").replace("{ 6 . ", "{ tcp . ")
NAMED = NAMED.replace("l4proto 17", "l4proto udp")


def numeric(text: str) -> str:
    """`text` (lbc's nft file) with every protocol written as nft lists it by number."""
    for name, number in NUMBERS.items():
        text = text.replace(f"meta l4proto {name} ", f"meta l4proto {number} ")
        text = re.sub(rf"(?<=[{{\t ]){name} \. ", f"{number} . ", text)
        text = text.replace(f" . {name} . ", f" . {number} . ")
    return text


def test_a_numeric_listing_parses_as_names() -> None:
    assert "17" not in str(nft_kernel.parse(NAMED))
    assert nft_kernel.parse(NUMERIC) == nft_kernel.parse(NAMED)


@pytest.mark.parametrize("case", CASES)
def test_every_golden_file_parses_the_same_by_number(case: str) -> None:
    text = (GOLDEN / case / "nftables.nft").read_text()
    changed = numeric(text)
    assert changed != text
    assert nft_kernel.parse(changed) == nft_kernel.parse(text)


def test_numbers_that_are_not_protocols_stay() -> None:
    """Only `meta l4proto` and `inet_proto` fields are read as protocols: ports,
    addresses and other numbers are left alone."""
    text = (
        "table inet lbc {\n"
        "\tset mark {\n"
        "\t\ttype ipv4_addr . inet_service\n"
        "\t\telements = { 10.0.0.6 . 6, 10.0.0.17 . 17 }\n"
        "\t}\n"
        "\n"
        "\tchain c {\n"
        "\t\tmeta l4proto 250 th dport 6 dnat ip to 10.0.0.6:17\n"
        "\t}\n"
        "}\n"
        "\n"
    )
    parsed = nft_kernel.parse(text)
    assert parsed["set mark"][-2:] == ("element 10.0.0.17 . 17", "element 10.0.0.6 . 6")
    assert parsed["chain c"] == ("meta l4proto 250 th dport 6 dnat ip to 10.0.0.6:17",)


@pytest.mark.netns
@pytest.mark.parametrize("case", CASES)
def test_the_kernels_listing_without_etc_protocols(case: str) -> None:
    """nft in a mount namespace where /etc/protocols is empty lists numbers; the parser
    reads the same objects as from lbc's own file."""
    netns.require("nft", "unshare")
    text = (GOLDEN / case / "nftables.nft").read_text()
    with netns.Lab() as lab:
        ns = lab.namespace("nft")
        ns.exec("nft", "-f", "/dev/stdin", input=text)
        script = "mount --bind /dev/null /etc/protocols && nft list table inet lbc"
        listed = ns.exec("unshare", "-m", "sh", "-c", script)
    assert re.search(r"\. (6|17|132) \.|\{ (6|17|132) \.|l4proto (6|17|132)", listed), listed
    assert nft_kernel.parse(listed) == nft_kernel.parse(text)
