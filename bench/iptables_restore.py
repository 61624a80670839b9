"""Why `iptables-restore --noflush` (iptables-nft 1.8.x) is quadratic, and the way around it.

    sudo python bench/iptables_restore.py                       # N = 250, 500, 1000
    sudo python bench/iptables_restore.py --sizes 5000 --variants sorted sorted+S plain
    sudo python bench/iptables_restore.py --updates --sizes 1000

Every line of a --noflush restore (a chain declaration, a rule, and the rule's jump
target once more) is recorded in iptables-nft's cache request by
`cache_chain_list_insert()` (iptables/nft-cache.c), a sorted linked list of chain
names walked from its head with strcmp: O(chains) per line, O(lines x chains) per
restore. A plain restore never builds that list: its table flush is a command
without a chain, which sets `all_chains` and skips the list. `-S` (list the table's
rules, read-only) is the other command without a chain that a restore accepts: as the
first line of a table it sets `all_chains` too, at the price of fetching (and
printing) the rules already in that table.

The IPv4 rules of N cluster-IP services with E endpoints (bench/gen.py) are compiled
with lbc and loaded into empty throwaway network namespaces in several line orders
and forms. Figures are the user CPU seconds of the restore process (the list walk is
all user time; the machine is shared, so wall time is noisy), median of --repeat runs.
`--updates` times reads and writes in a namespace that already holds the N services:
`iptables-save -t nat`, all chains rewritten and one service chain rewritten, with and
without the `-S` line. iptables-nft sorts the chains it lists (`-S`, iptables-save)
with a quicksort whose pivot is the first chain (`__nft_chain_list_sort()`), and the
kernel returns chains in creation order: chains created in sorted name order make
that sort quadratic, chains created in hash order do not.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lbc
from bench.gen import generate
from lbc.backends.iptables.kernel import parse

Chains = dict[str, dict[str, list[str]]]  # table -> chain -> its `-A` lines, in order
NOFLUSH = ["iptables-nft-restore", "-w", "--noflush"]


@contextmanager
def namespace() -> Iterator[str]:
    """A fresh, empty network namespace, deleted afterwards."""
    name = f"lbcx-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def user_cpu(ns: str, argv: list[str], document: str) -> float:
    """Run `argv` in `ns` with `document` on stdin; its user CPU seconds."""
    with tempfile.TemporaryFile("w+") as doc, tempfile.TemporaryFile("w+") as err:
        doc.write(document)
        doc.seek(0)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], stdin=doc, stdout=subprocess.DEVNULL, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv)} failed: {err.read().strip()[:300]}")
    return usage.ru_utime


def chains_of(rendered: str) -> Chains:
    """lbc's own chains of a rendered document (the hooks in built-in chains left out)."""
    out: Chains = {}
    for k, rules in parse(4, rendered).items():
        _, table, chain, *rest = k.split()
        if not rest:
            out.setdefault(table, {})[chain] = list(rules)
    return out


def targets_first(chains: dict[str, list[str]]) -> list[str]:
    """Chain names ordered so that every jump target comes before the chains jumping to it."""
    seen: set[str] = set()
    order: list[str] = []

    def visit(name: str) -> None:
        seen.add(name)
        for rule in chains[name]:
            words = rule.split()
            target = words[words.index("-j") + 1] if "-j" in words else ""
            if target in chains and target not in seen:
                visit(target)
        order.append(name)

    for name in sorted(chains):
        if name not in seen:
            visit(name)
    return order


def _declare(name: str, form: str) -> str:
    return f"-N {name}" if form == "-N" else f":{name} - [0:0]"


def _rules(rules: list[str], form: str) -> list[str]:
    return ["-I" + r[2:] for r in reversed(rules)] if form == "-I" else rules


def document(
    chains: Chains, order: str = "sorted", form: str = ":", list_first: bool = False
) -> str:
    """One restore document: per table, the chains declared, then their rules.

    order: `sorted` (as lbc's kernel adapter writes it), `reverse`, `hashed` (by a hash
    of the name: deterministic, far from sorted), or `interleaved` (targets first, each
    chain declared right before its own rules).
    form: `:` (`:NAME - [0:0]`), `-N` (`-N NAME`), `-I` (rules inserted, reversed).
    list_first: a `-S` line opens each table.
    """
    out: list[str] = []
    for table, by_name in chains.items():
        names = sorted(by_name)
        if order == "reverse":
            names.reverse()
        elif order == "hashed":
            names.sort(key=lambda name: hashlib.sha1(name.encode()).digest())
        elif order == "interleaved":
            names = targets_first(by_name)
        out += [f"*{table}", "-S"] if list_first else [f"*{table}"]
        if order == "interleaved":
            for name in names:
                out += [_declare(name, form), *_rules(by_name[name], form)]
        else:
            out += [_declare(name, form) for name in names]
            for name in names:
                out += _rules(by_name[name], form)
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def split(chains: Chains, size: int) -> list[str]:
    """Several documents of at most `size` chains, jump targets in earlier documents."""
    docs = []
    for table, by_name in chains.items():
        order = targets_first(by_name)
        for i in range(0, len(order), size):
            part = {table: {name: by_name[name] for name in order[i : i + size]}}
            docs.append(document(part, "interleaved"))
    return docs


Variant = Callable[[str, Chains], float]  # (rendered document, chains) -> user CPU seconds


def fresh(argv: list[str], make: Callable[[str, Chains], str]) -> Variant:
    def run(rendered: str, chains: Chains) -> float:
        with namespace() as ns:
            return user_cpu(ns, argv, make(rendered, chains))

    return run


def fresh_split(size: int) -> Variant:
    def run(rendered: str, chains: Chains) -> float:
        with namespace() as ns:
            return sum(user_cpu(ns, NOFLUSH, doc) for doc in split(chains, size))

    return run


VARIANTS: dict[str, tuple[str, Variant]] = {
    "render": ("lbc's rendered order (hooks included)", fresh(NOFLUSH, lambda r, c: r)),
    "sorted": (
        "declarations sorted, then rules (kernel.py today)",
        fresh(NOFLUSH, lambda r, c: document(c)),
    ),
    "no-w": ("sorted, without -w", fresh(NOFLUSH[:1] + NOFLUSH[2:], lambda r, c: document(c))),
    "reverse": (
        "declarations and rules in reverse order",
        fresh(NOFLUSH, lambda r, c: document(c, "reverse")),
    ),
    "interleaved": (
        "targets first, each chain declared before its rules",
        fresh(NOFLUSH, lambda r, c: document(c, "interleaved")),
    ),
    "dash-N": ("sorted, -N instead of :", fresh(NOFLUSH, lambda r, c: document(c, form="-N"))),
    "insert": (
        "sorted, -I (reversed) instead of -A",
        fresh(NOFLUSH, lambda r, c: document(c, form="-I")),
    ),
    "split1000": ("restores of <= 1000 chains, summed", fresh_split(1000)),
    "sorted+S": (
        "sorted, `-S` first in each table",
        fresh(NOFLUSH, lambda r, c: document(c, list_first=True)),
    ),
    "hashed+S": (
        "declarations in hash order, `-S` first in each table",
        fresh(NOFLUSH, lambda r, c: document(c, "hashed", list_first=True)),
    ),
    "plain": (
        "plain iptables-restore (flushes the tables)",
        fresh(["iptables-nft-restore", "-w"], lambda r, c: document(c)),
    ),
    "legacy": (
        "iptables-legacy-restore --noflush",
        fresh(["iptables-legacy-restore", "-w", "--noflush"], lambda r, c: document(c)),
    ),
}
DEFAULT = [
    "render",
    "sorted",
    "reverse",
    "interleaved",
    "dash-N",
    "insert",
    "split1000",
    "sorted+S",
    "hashed+S",
    "plain",
    "legacy",
]


def updates(chains: Chains, repeat: int) -> dict[str, float]:
    """Reads and writes in a namespace already holding these chains (loaded by a plain
    restore in sorted or hashed order: the kernel lists chains in creation order)."""
    nat = chains["nat"]
    one_name = next(name for name in sorted(nat) if name.startswith("LBC-SVC-"))
    one = {"nat": {one_name: nat[one_name]}}
    save = ["iptables-nft-save", "-t", "nat"]
    cases = {  # case: (creation order, command, stdin)
        "iptables-save -t nat, created sorted": ("sorted", save, ""),
        "iptables-save -t nat, created hashed": ("hashed", save, ""),
        "rewrite all, sorted (today)": ("sorted", NOFLUSH, document(chains)),
        "rewrite all, sorted, -S": ("sorted", NOFLUSH, document(chains, list_first=True)),
        "rewrite all, hashed, -S": (
            "hashed",
            NOFLUSH,
            document(chains, "hashed", list_first=True),
        ),
        "rewrite one chain": ("hashed", NOFLUSH, document(one)),
        "rewrite one chain, -S": ("hashed", NOFLUSH, document(one, list_first=True)),
    }
    out: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(repeat):
        for case, (order, argv, doc) in cases.items():
            with namespace() as ns:
                user_cpu(ns, ["iptables-nft-restore", "-w"], document(chains, order))
                out[case].append(user_cpu(ns, argv, doc))
    return {case: statistics.median(times) for case, times in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    parser.add_argument("--updates", action="store_true", help="time re-applies, not loads")
    args = parser.parse_args(argv)

    rows: dict[str, dict[int, float]] = {}
    for n in args.sizes:
        text, _ = generate(n, args.endpoints, seed=1)
        rendered = lbc.compile(lbc.loads(text), "iptables").data[4]
        chains = chains_of(rendered)
        count = sum(len(c) for c in chains.values())
        rules = sum(len(r) for c in chains.values() for r in c.values())
        print(f"N={n}: {count} chains, {rules} rules", file=sys.stderr)
        if args.updates:
            for case, t in updates(chains, args.repeat).items():
                rows.setdefault(case, {})[n] = t
            continue
        for name in args.variants:
            times = [VARIANTS[name][1](rendered, chains) for _ in range(args.repeat)]
            rows.setdefault(name, {})[n] = statistics.median(times)

    label = "case" if args.updates else "variant"
    width = max(len(label), *(len(r) for r in rows))
    print(f"{label:<{width}}  " + "  ".join(f"{'N=' + str(n):>8}" for n in args.sizes), end="")
    print("" if args.updates else "  description")
    for name, times in rows.items():
        cells = "  ".join(f"{times[n]:>7.2f}s" for n in args.sizes)
        print(f"{name:<{width}}  {cells}" + ("" if args.updates else f"  {VARIANTS[name][0]}"))
    print("user CPU seconds of the command, median of", args.repeat, "runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
