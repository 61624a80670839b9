"""Every golden case, every built-in backend: output (or refusal) equals the golden file."""

from __future__ import annotations

import pytest

import lbc
from tests.golden import CASES, GOLDEN, builtin_backends, compare, expected_output, golden_name

BACKENDS = builtin_backends()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, backend: str, update_golden: bool) -> None:
    name, text = expected_output(case, BACKENDS[backend])
    if update_golden:
        for stale in (golden_name(BACKENDS[backend]), golden_name(BACKENDS[backend], True)):
            if stale != name:
                (GOLDEN / case / stale).unlink(missing_ok=True)
    compare(GOLDEN / case / name, text, update_golden)


@pytest.mark.parametrize("case", CASES)
def test_rendering_twice_gives_identical_bytes(case: str) -> None:
    for backend in BACKENDS.values():
        first = expected_output(case, backend)
        second = expected_output(case, backend)
        assert first == second, f"{case}/{backend.name} is not deterministic"


def test_no_golden_file_is_unread() -> None:
    """Every file under golden/ is a case input or the expected output of a backend."""
    expected = {
        (case, expected_output(case, backend)[0]) for case in CASES for backend in BACKENDS.values()
    }
    stray = sorted(
        str(p.relative_to(GOLDEN))
        for p in GOLDEN.rglob("*")
        if p.is_file() and p.name != "cluster.toml" and (p.parent.name, p.name) not in expected
    )
    assert not stray, f"golden files no test reads: {stray}"
    orphans = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir() and p.name not in CASES)
    assert not orphans, f"golden directories without cluster.toml: {orphans}"


def test_cases_cover_the_issue_minimum() -> None:
    for case in ("hostnames", "weighted", "no-endpoints", "ipv6", "many-services"):
        assert case in CASES
    assert lbc.load(GOLDEN / "many-services" / "cluster.toml").services.__len__() >= 20
