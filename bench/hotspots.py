"""cProfile one stage of a compile of a synthetic cluster; print the top costs.

    python bench/hotspots.py --services 10000 --endpoints 10 --stage lower
    python bench/hotspots.py --stage render --backend iptables --sort cumulative

Stages are those of `bench/compile.py`: parse, validate (all of `lbc.loads`, its
parse included), lower, render (`backend.compile` and the artifact's text). Under
cProfile, Python-level calls cost several times more than they do unprofiled: read
the ranking, not the absolute seconds. The garbage collector's passes are charged to
whichever call allocates when one starts; `--no-gc` leaves them out, so the ranking
shows the stage's own work (`bench/compile.py --no-gc` gives the collector's share).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys

import tomli
from gen import generate

import lbc


def main(argv: list[str] | None = None) -> None:
    """Profile the chosen stage and print the first `--top` lines of the ranking."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per service")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--external", action="store_true", help="add NodePort/LoadBalancers")
    parser.add_argument(
        "--stage", choices=("parse", "validate", "lower", "render"), default="lower"
    )
    parser.add_argument("--backend", default="iptables")
    parser.add_argument("--sort", default="tottime", help="a pstats sort key")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-gc", action="store_true", help="disable the cyclic GC")
    args = parser.parse_args(argv)
    if args.no_gc:
        gc.disable()

    text, _ = generate(args.services, args.endpoints, seed=args.seed, external=args.external)
    backend = lbc.backends()[args.backend]
    profile = cProfile.Profile()
    if args.stage == "parse":
        profile.runcall(tomli.loads, text)
    elif args.stage == "validate":
        profile.runcall(lbc.loads, text)
    elif args.stage == "lower":
        profile.runcall(lbc.lower, lbc.loads(text))
    else:
        program = lbc.lower(lbc.loads(text))
        profile.runcall(lambda: backend.compile(program).text())
    stats = pstats.Stats(profile, stream=sys.stdout)
    stats.sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
