"""The README's promises: its example config is valid, every key is documented, CI runs
the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import lbc
from lbc.compiler.model import Endpoint, Node, Service, ServicePort

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_cluster_toml_example_is_valid_and_compiles() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README, re.S)
    assert blocks, "no toml example in the README"
    for block in blocks:
        cluster = lbc.load(block)
        for backend in ("ir", "iptables", "nftables"):
            assert lbc.compile(cluster, backend).text()


def test_every_key_of_the_schema_is_documented() -> None:
    for prefix, model in (
        ("node.", Node),
        ("services[].", Service),
        ("services[].ports[]", ServicePort),
        ("services[].endpoints[]", Endpoint),
    ):
        for field in model.model_fields:
            if prefix.endswith("."):
                documented = f"`{prefix}{field}`" in README or f"`{prefix}{field}[]`" in README
                assert documented, f"{prefix}{field} is not documented"
            else:
                row = next(line for line in README.splitlines() if f"`{prefix}`" in line)
                assert f"`{field}`" in row, f"{prefix}.{field} is not documented"


def test_ci_runs_the_readme_test_command() -> None:
    assert "./scripts/test.sh" in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "./scripts/test.sh" in ci
    assert (
        "python3 -m venv .venv && .venv/bin/pip install . && "
        ".venv/bin/lbc compile examples/hostnames.toml --backend iptables"
    ) in README


def test_the_bad_input_corpus_is_counted_right() -> None:
    """Every count of tests/bad/ the README gives is the number of files there."""
    files = len(list((ROOT / "tests" / "bad").glob("*.toml")))
    counts = re.findall(r"(\d+) broken files|the (\d+)-file bad-input corpus", README)
    assert len(counts) == 2, counts
    assert {int(a or b) for a, b in counts} == {files}
