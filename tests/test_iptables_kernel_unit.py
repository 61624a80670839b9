"""The iptables adapter's restore documents and the state objects it is given, without a kernel."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import lbc
from bench.gen import generate
from lbc.apply.state import State
from lbc.backends.iptables.kernel import LIST_FIRST_FROM, IptablesKernel, key, parse
from lbc.backends.iptables.render import Documents, PoolCache, render_documents
from lbc.compiler.lower import lower_service, merge, node_info
from lbc.compiler.model import Service
from lbc.ir.nodes import Program
from tests.test_session import change


def document(chains: int) -> str:
    desired = State(
        {
            key(4, "nat", f"LBC-SEP-{i:016d}"): (f"-A LBC-SEP-{i:016d} -j RETURN",)
            for i in range(chains)
        }
    )
    kernel = IptablesKernel(runner=lambda argv, stdin=None: "")
    return kernel._restore_document(4, desired, set(desired.objects), delete=False)


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


def test_stale_chains_are_deleted_in_the_same_restore_unless_jumped_to() -> None:
    stale = {key(4, "nat", "LBC-SEP-OLD"), key(4, "nat", "LBC-SERVICES")}
    kernel = IptablesKernel(runner=lambda argv, stdin=None: "")
    first = kernel._restore_document(4, State({}), stale, delete=False).splitlines()
    assert "-X LBC-SEP-OLD" in first and "-X LBC-SERVICES" not in first
    assert ":LBC-SERVICES - [0:0]" in first, "emptied in the first pass"
    second = kernel._restore_document(4, State({}), stale, delete=True).splitlines()
    assert second == ["*nat", "-X LBC-SERVICES", "COMMIT"]


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


def test_a_render_from_the_pool_cache_is_the_whole_render() -> None:
    """Rendering again with the last render's pool chains (as a session does) gives the
    objects a render from scratch gives, after every random change."""
    cluster = lbc.loads(generate(150, 4, seed=5, external=True)[0])
    info = node_info(cluster)
    lowered: dict[int, tuple[Service, Program]] = {}  # by service object, as a session keeps
    cache = PoolCache()
    rng, spare, current = random.Random(5), [], cluster
    reused = 0
    for _ in range(12):
        current = change(rng, current, spare)
        programs = []
        for svc in current.services:
            kept = lowered.get(id(svc))
            if kept is None or kept[0] is not svc:
                kept = lowered[id(svc)] = (svc, lower_service(info, svc))
            programs.append(kept[1])
        program = merge(info, programs)
        last = {k: v for made in cache.families.values() for k, v in made.items()}
        cached = render_documents(program, cache, text=False)
        assert cached.objects == render_documents(program).objects
        assert not cached  # no restore text was made
        now = {k: v for made in cache.families.values() for k, v in made.items()}
        reused += sum(1 for k, v in now.items() if last.get(k) is v)
    assert reused > 500, "unchanged pools came from the cache"
