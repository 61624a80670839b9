"""The iptables adapter's restore documents, without a kernel."""

from __future__ import annotations

from lbc.apply.state import State
from lbc.backends.iptables.kernel import LIST_FIRST_FROM, IptablesKernel, key


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
