"""The iptables adapter's restore documents and the state objects it is given, without a kernel."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import lbc
from bench.gen import generate
from lbc.apply.state import State, plan_between
from lbc.backends.iptables import incremental
from lbc.backends.iptables import names as n
from lbc.backends.iptables.kernel import LIST_FIRST_FROM, IptablesKernel, key, parse
from lbc.backends.iptables.render import LARGE_CLUSTER_ENDPOINTS, Documents, render_documents
from lbc.compiler.lower import lower_service, node_info
from lbc.compiler.model import Service
from tests.test_iptables_render import large_config
from tests.test_session import change


def sep_chains(chains: int) -> dict[str, tuple[str, ...]]:
    """`chains` nat chains of one rule each, as state objects."""
    return {
        key(4, "nat", f"LBC-SEP-{i:016d}"): (f"-A LBC-SEP-{i:016d} -j RETURN",)
        for i in range(chains)
    }


def document(chains: int) -> str:
    desired = State(sep_chains(chains))
    kernel = IptablesKernel(runner=lambda argv, stdin=None: "")
    return "".join(kernel._restore_documents(4, State({}), desired, set(desired.objects)))


def test_small_writes_do_not_list_the_table() -> None:
    lines = document(3).splitlines()
    assert lines[0] == "*nat" and lines[1].startswith(":LBC-SEP-") and "-S" not in lines


def test_large_writes_start_with_a_listing_that_avoids_the_quadratic_path() -> None:
    lines = document(LIST_FIRST_FROM).splitlines()
    assert lines[:2] == ["*nat", "-S"]
    assert lines[-1] == "COMMIT"


def test_chains_are_created_in_hash_order_not_name_order() -> None:
    declared = [line for line in document(50).splitlines() if line.startswith(":")]
    assert len(declared) == 50 and declared != sorted(declared)
    assert declared == [line for line in document(50).splitlines() if line.startswith(":")]


def test_each_chain_is_declared_with_its_rules_after_the_chains_it_jumps_to() -> None:
    """A full write declares every chain just before its rules, and only after every
    chain it jumps to (iptables-nft finds recently declared chains fastest), holding
    exactly the rendered chains."""
    artifact = lbc.compile(lbc.loads(generate(300, 4, seed=3, external=True)[0]), "iptables")
    assert isinstance(artifact.data, Documents)
    desired = State(dict(artifact.data.objects))
    kernel = IptablesKernel(runner=lambda argv, stdin=None: "")
    document = "".join(kernel._restore_documents(4, State({}), desired, set(desired.objects)))
    declared: list[str] = []
    current = ""
    for line in document.splitlines():
        if line.startswith("*"):
            declared, current = [], ""
        elif line.startswith(":"):
            current = line[1:].split()[0]
            declared.append(current)
        elif line.startswith("-A "):
            words = line.split()
            assert words[1] == current, f"a rule of {words[1]} away from its declaration"
            if "-j" in words and words[words.index("-j") + 1].startswith("LBC-"):
                target = words[words.index("-j") + 1]
                assert target in declared[:-1], f"{current} jumps to {target} before it exists"
    written = {k: v for k, v in desired.objects.items() if k.startswith("ipv4 ")}
    assert parse(4, document) == {k: v for k, v in written.items() if not k.endswith(" jumps")}
    svc = [c for c in declared if c.startswith("LBC-SVC-")]
    assert len(svc) > 300 and svc != sorted(svc), "chains in hash order, not name order"


def test_stale_chains_are_emptied_then_deleted_after_the_jumps_to_them() -> None:
    hook = key(4, "nat", "PREROUTING") + " jumps"
    jump = '-A PREROUTING -m comment --comment "lbc service portals" -j LBC-SERVICES'
    live = State(
        {key(4, "nat", "LBC-SEP-OLD"): (), key(4, "nat", "LBC-SERVICES"): (), hook: (jump,)}
    )
    stale = set(live.objects)
    kernel = IptablesKernel(runner=lambda argv, stdin=None: "")
    (document,) = kernel._restore_documents(4, live, State({}), stale)
    lines = document.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT" and lines.count("*nat") == 1
    assert {":LBC-SEP-OLD - [0:0]", ":LBC-SERVICES - [0:0]"} <= set(lines[1:3]), "emptied first"
    removal = '-D PREROUTING -m comment --comment "lbc service portals" -j LBC-SERVICES'
    assert lines[3:6] == ["-X LBC-SEP-OLD", removal, "-X LBC-SERVICES"], "after the jump"


def test_large_writes_change_the_jumps_in_a_second_restore_without_a_listing() -> None:
    """After a leading `-S`, iptables-nft cannot insert into a built-in chain the kernel
    does not have yet: the jumps (and the chains they leave) follow in a second document."""
    desired = sep_chains(LIST_FIRST_FROM)
    hook = key(4, "nat", "OUTPUT") + " jumps"
    desired[hook] = ("-A OUTPUT -j LBC-SEP-0000000000000000",)
    kernel = IptablesKernel(runner=lambda argv, stdin=None: "")
    first, late = kernel._restore_documents(4, State({}), State(desired), set(desired))
    assert first.startswith("*nat\n-S\n") and "-I OUTPUT" not in first
    assert late == "*nat\n-I OUTPUT -j LBC-SEP-0000000000000000\nCOMMIT\n"


def test_jumps_from_built_in_chains_are_inserted_after_their_targets_exist() -> None:
    hook = key(4, "nat", "OUTPUT") + " jumps"
    jump = '-A OUTPUT -m comment --comment "lbc service portals" -j LBC-SERVICES'
    services = key(4, "nat", "LBC-SERVICES")
    desired = State({services: ("-A LBC-SERVICES -j RETURN",), hook: (jump,)})
    kernel = IptablesKernel(runner=lambda argv, stdin=None: "")
    (document,) = kernel._restore_documents(4, State({}), desired, set(desired.objects))
    lines = document.splitlines()
    assert lines == [
        "*nat",
        ":LBC-SERVICES - [0:0]",
        "-A LBC-SERVICES -j RETURN",
        '-I OUTPUT -m comment --comment "lbc service portals" -j LBC-SERVICES',
        "COMMIT",
    ]
    again = kernel._restore_documents(4, desired, desired, {hook})
    assert again == [], "a jump already there is not inserted twice"


GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@pytest.mark.parametrize(
    "config",
    [
        # Every case the backend compiles (the others have an iptables.unsupported).
        *sorted(p.parent / "cluster.toml" for p in GOLDEN.glob("*/iptables.rules")),
        generate(300, 4, seed=3, external=True)[0],
    ],
    ids=lambda c: c.parent.name if isinstance(c, Path) else "synthetic-300",
)
def test_rendered_state_objects_are_what_reading_the_documents_gives(config: Path | str) -> None:
    """The adapter takes the objects the renderer made instead of parsing its documents:
    they must be exactly what parsing gives, key for key and line for line."""
    cluster = lbc.load(config) if isinstance(config, Path) else lbc.loads(config)
    artifact = lbc.compile(cluster, "iptables")
    documents = artifact.data
    assert isinstance(documents, Documents)
    parsed: dict[str, tuple[str, ...]] = {}
    for family, document in documents.items():
        parsed.update(parse(family, document))
    assert documents.objects == parsed
    assert any(k.endswith(" jumps") for k in parsed) and len(parsed) > 8
    kernel = IptablesKernel(runner=lambda argv, stdin=None: "")
    assert kernel.desired(artifact).objects == parsed


@pytest.mark.parametrize(
    ("services", "endpoints", "seed"),
    [(120, 4, 5), (120, 4, 6), (1100, 1, 7)],
    ids=["small-5", "small-6", "large-one-endpoint-7"],
)
def test_the_per_service_table_is_the_whole_render_after_random_changes(
    services: int, endpoints: int, seed: int
) -> None:
    """`incremental.Table`, updated service by service, holds exactly the objects of a
    whole render of the same cluster, and reports exactly the objects that changed. The
    large cluster's pools of one endpoint gain and lose endpoints and affinity, so they
    move between the forms with and without an endpoint chain."""
    cluster = lbc.loads(generate(services, endpoints, seed=seed, external=True)[0])
    golden = [lbc.load(p) for p in sorted(GOLDEN.glob("*/cluster.toml"))]
    info = node_info(cluster)
    table = incremental.Table(info)

    def key(svc: Service) -> str:
        return f"{svc.namespace}/{svc.name}"

    table.update({key(s): incremental.part_of(lower_service(info, s)) for s in cluster.services})
    whole = render_documents(lbc.lower(cluster)).objects
    assert table.objects == whole
    rng, spare, current = random.Random(seed), [], cluster
    flips = 0  # pool chains that changed between DNAT-ing and jumping to endpoints
    # Golden services (node ports, local policies, IPv6, ...) join and leave too.
    spare += [s for c in golden for s in c.services]
    rng.shuffle(spare)
    for _ in range(40):
        before = dict(table.objects)
        previous = {key(s): s for s in current.services}
        current = change(rng, current, spare)
        now = {key(s): s for s in current.services}
        updates: dict[str, incremental.Part | None] = {
            k: incremental.part_of(lower_service(info, s))
            for k, s in now.items()
            if previous.get(k) is not s
        }
        updates.update({k: None for k in previous.keys() - now.keys()})
        reported = table.update(updates)
        whole = render_documents(lbc.lower(current)).objects
        assert table.objects == whole
        assert reported == plan_between("iptables", State(before), State(whole)).changes
        for c in reported:
            if c.before and c.after and c.key.split()[2].startswith(n.SVC):
                lone = ["-j DNAT" in rules[-1] for rules in (c.before, c.after)]
                flips += lone[0] != lone[1]
    assert table.large is (endpoints == 1)
    # A pool of the large cluster gained or lost its endpoint chain at least once.
    assert flips > 0 if table.large else flips == 0


@pytest.mark.parametrize(("services", "endpoints"), [(250, 4), (1000, 1)])
def test_the_per_service_table_follows_the_large_cluster_threshold_both_ways(
    services: int, endpoints: int
) -> None:
    """Crossing LARGE_CLUSTER_ENDPOINTS (up, then down) re-renders every service's chains
    in the other form: the table stays the whole render, and reports every chain whose
    rules changed, as a plan from the previous state would. With one endpoint per
    service, the endpoint chains of the pools without affinity go and come back."""
    base = lbc.loads(large_config(services, endpoints))  # exactly the threshold
    grown = lbc.loads(large_config(services, endpoints, extra=1))
    info = node_info(base)
    table = incremental.Table(info)

    def parts(cluster: lbc.Cluster, only: str | None = None) -> dict[str, incremental.Part]:
        return {
            f"{s.namespace}/{s.name}": incremental.part_of(lower_service(info, s))
            for s in cluster.services
            if only is None or s.name == only
        }

    table.update(parts(base))
    assert not table.large and table.endpoints == LARGE_CLUSTER_ENDPOINTS
    states = [render_documents(lbc.lower(base)).objects]
    assert table.objects == states[0]
    for cluster, large in ((grown, True), (base, False)):
        before = dict(table.objects)
        reported = table.update(parts(cluster, only="svc-0000"))
        whole = render_documents(lbc.lower(cluster)).objects
        assert table.large is large and table.objects == whole
        assert reported == plan_between("iptables", State(before), State(whole)).changes
        assert len(reported) > 1000, "every service's chains changed form"
        # An endpoint chain per endpoint, except, in a large cluster, in the pools of
        # one endpoint without affinity (every fourth service has affinity; the grown
        # cluster is the large one, with one more endpoint on svc-0000).
        sizes = [endpoints + (1 if large and i == 0 else 0) for i in range(services)]
        want = sum(c for i, c in enumerate(sizes) if not large or i % 4 == 0 or c > 1)
        assert sum(k.split()[2].startswith(n.SEP) for k in whole) == want
