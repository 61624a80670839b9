"""The `lbc` command raises the GC thresholds for its own run, and puts them back."""

from __future__ import annotations

import gc

from click.testing import CliRunner

from lbc.cli import main


def test_the_command_restores_the_gc_thresholds() -> None:
    seen: list[tuple[int, int, int]] = []
    before = gc.get_threshold()

    @main.command("gc-probe", hidden=True)
    def probe() -> None:
        seen.append(gc.get_threshold())

    try:
        result = CliRunner().invoke(main, ["gc-probe"])
    finally:
        main.commands.pop("gc-probe", None)
    assert result.exit_code == 0, result.output
    assert seen == [(100_000, 50, 1000)]
    assert gc.get_threshold() == before
