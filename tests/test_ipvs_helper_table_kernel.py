"""The IPVS backend's nftables helper table on this machine's kernel (no IPVS needed):
loaded with `nft -f` into a namespace of its own, what a snapshot reads of it is what
the desired state holds, for every golden case and for addresses nft lists in another
form. Otherwise every IPVS apply, which reads back, would roll itself back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import lbc
from lbc.backends.ipvs import kernel as k
from lbc.backends.ipvs.ops import LoadRules
from tests import netns
from tests.configs import ANY_SOURCE_AND_DOTTED_TAILS
from tests.golden import CASES, GOLDEN

pytestmark = pytest.mark.netns


def artifacts() -> Iterator[tuple[str, lbc.Artifact]]:
    """Every golden case IPVS can express (the others have `ipvs.unsupported`), and
    addresses nft lists with a dotted IPv4 tail."""
    for case in CASES:
        if not (GOLDEN / case / "ipvs.unsupported").exists():
            yield case, lbc.compile(lbc.load(GOLDEN / case / "cluster.toml"), "ipvs")
    yield "dotted-tails", lbc.compile(lbc.loads(ANY_SOURCE_AND_DOTTED_TAILS), "ipvs")


@pytest.fixture(scope="module")
def scratch() -> Iterator[netns.Netns]:
    netns.require("nft")
    with netns.Lab() as lab:
        yield lab.namespace("ipvs-rules")


ARTIFACTS = dict(artifacts())


@pytest.mark.parametrize("case", ARTIFACTS)
def test_the_helper_table_reads_back_as_desired(case: str, scratch: netns.Netns) -> None:
    artifact = ARTIFACTS[case]
    (rules,) = [op for op in artifact.data if isinstance(op, LoadRules)]
    scratch.exec("nft", "-f", "-", input=rules.script())
    listing = scratch.exec("nft", "list", "table", rules.family, rules.table)
    desired = k.desired_state(artifact.data).objects
    wanted = {key: lines for key, lines in desired.items() if key in k.rules_objects(rules.text)}
    assert k.rules_objects(listing) == wanted


def test_an_object_another_writer_added_to_the_helper_table_is_removed(
    scratch: netns.Netns,
) -> None:
    """A counter someone added inside lbc's helper table is drift: the change from the
    table as listed to the desired one replaces the table, which leaves it out."""
    artifact = ARTIFACTS["hostnames"]
    (rules,) = [op for op in artifact.data if isinstance(op, LoadRules)]
    scratch.exec("nft", "-f", "-", input=rules.script())
    scratch.exec("nft", "add", "counter", rules.family, rules.table, "seen")
    listed = k.rules_objects(scratch.exec("nft", "list", "table", rules.family, rules.table))
    desired = k.desired_state(artifact.data).objects
    wanted = {key: lines for key, lines in desired.items() if key in k.rules_objects(rules.text)}
    assert set(listed) - set(wanted) == {k.RULES + "counter seen"}
    step = k.rules_change(listed, wanted)
    assert step.verb == "replacing"
    scratch.exec("nft", "-f", "-", input=step.script)
    after = scratch.exec("nft", "list", "table", rules.family, rules.table)
    assert "counter seen" not in after
    assert k.rules_objects(after) == wanted
