"""Golden-file helpers: where the cases are, and compare-or-update with a readable diff."""

from __future__ import annotations

import difflib
from pathlib import Path

import lbc
from lbc import plugins
from lbc.backends.base import Backend

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "cluster.toml").is_file())


def builtin_backends() -> dict[str, Backend]:
    """The backends lbc ships (golden files cover exactly these)."""
    return dict(plugins.backends(plugins.plugin_manager(load_entry_points=False)))


def golden_name(backend: Backend, unsupported: bool = False) -> str:
    """`iptables.rules`, `ir.txt`, or `<backend>.unsupported` for a refusal."""
    return f"{backend.name}.unsupported" if unsupported else f"{backend.name}.{backend.extension}"


def expected_output(case: str, backend: Backend) -> tuple[str, str]:
    """(file name, text) that `backend` produces for `case`: output or refusal."""
    cluster = lbc.load(GOLDEN / case / "cluster.toml")
    try:
        return golden_name(backend), lbc.compile(cluster, backend=backend).text()
    except lbc.UnsupportedError as exc:
        return golden_name(backend, unsupported=True), str(exc) + "\n"


def compare(path: Path, actual: str, update: bool) -> None:
    """Assert `path` holds `actual`; with `update`, rewrite it instead."""
    if update:
        path.write_text(actual, encoding="utf-8")
        return
    expected = path.read_text(encoding="utf-8") if path.exists() else ""
    if expected != actual:
        rel = path.relative_to(ROOT)
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile=f"{rel} (golden)",
                tofile=f"{rel} (now)",
            )
        )
        raise AssertionError(
            f"{rel} differs from the output (run `pytest --update-golden` to accept):\n{diff}"
        )
