"""Compile benchmark: time and peak memory of each stage of lbc on a synthetic cluster.

    python bench/compile.py --services 10000 --endpoints 10 --repeat 3
    python bench/compile.py --services 10000 --endpoints 10 --backend iptables --linearity

Method. The cluster comes from `bench/gen.py` and is written to a temporary file.
Every run is a fresh Python process (so no run warms another's caches or heap) that
imports lbc, reads the file, then times each stage twice over: wall time
(`time.perf_counter`) and the process's CPU time (`time.process_time`, which a busy
host inflates far less than wall time):

- parse:    `tomli.loads`, timed from inside `lbc.loads`
- validate: the rest of `lbc.loads`: pydantic's `Cluster.model_validate` and the
            semantic checks
- lower:    `lbc.lower`, the config model to the IR program
- render:   `backend.compile` (capability check plus render) and the artifact's text

Memory is the process's `ru_maxrss` high-water mark (Linux, KiB): the figure for a
stage is how much that stage raised the mark, and "peak" is the mark at the end,
interpreter and imports included. "tomli alone" and "tomllib alone" parse the same
file in their own fresh processes. Every figure is the median of the runs; a ratio
is a median total over the median tomli-alone time, on the same clock.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gen import generate

STAGES = ("parse", "validate", "lower", "render")
CLOCKS = ("wall", "cpu")
PARSE_RUNS = 5  # at least this many runs for tomli against tomllib
TARGET_RATIO = 3.0  # total compile time over tomli's parse of the same file
TARGET_LINEAR = 11.0  # ten times the services may take at most this many times as long
TARGET_PEAK_MIB = 1024


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _worker_parse(path: str, parser: str) -> dict[str, Any]:
    """One parse of `path` by tomli or tomllib, in this (fresh) process."""
    module = __import__(parser)
    text = Path(path).read_text(encoding="utf-8")
    rss = _rss_kib()
    wall, cpu = _clocks()
    module.loads(text)
    wall_end, cpu_end = _clocks()
    return {
        "wall": wall_end - wall,
        "cpu": cpu_end - cpu,
        "rss_kib": _rss_kib() - rss,
        "peak_kib": _rss_kib(),
    }


def _worker_stages(path: str, backend_name: str) -> dict[str, Any]:
    """The four stages of a compile of `path` with one backend, in this (fresh) process."""
    import tomli

    import lbc

    backend = lbc.backends()[backend_name]
    text = Path(path).read_text(encoding="utf-8")
    times: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
    rss: dict[str, int] = {}
    base = _rss_kib()
    last_rss, (last_wall, last_cpu) = base, _clocks()

    def mark(stage: str) -> None:
        nonlocal last_rss, last_wall, last_cpu
        (wall, cpu), high = _clocks(), _rss_kib()
        times["wall"][stage], times["cpu"][stage] = wall - last_wall, cpu - last_cpu
        rss[stage] = high - last_rss
        last_rss, (last_wall, last_cpu) = high, _clocks()

    # `lbc.loads` is parse then validate; timing the parse from inside it splits the two
    # without copying its steps here, whatever validation grows into.
    parse = tomli.loads

    def timed_parse(source: str, **kwargs: Any) -> dict[str, Any]:
        data = parse(source, **kwargs)
        mark("parse")
        return data

    tomli.loads = timed_parse
    try:
        cluster = lbc.loads(text)
    finally:
        tomli.loads = parse
    if "parse" not in rss:
        raise SystemExit("lbc.loads no longer calls tomli.loads: update bench/compile.py")
    mark("validate")
    program = lbc.lower(cluster)
    mark("lower")
    try:
        output = backend.compile(program).text()
    except lbc.UnsupportedError as exc:  # a refusal is an output too; time it all the same
        output = str(exc)
    mark("render")
    return {
        **times,
        "rss_kib": rss,
        "base_kib": base,
        "peak_kib": _rss_kib(),
        "output_bytes": len(output.encode()),
    }


def _run(no_gc: bool, *args: str) -> dict[str, Any]:
    """Run this script as a worker in a fresh interpreter; return its JSON report."""
    flags = ["--no-gc"] if no_gc else []
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *flags, *args], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"worker {' '.join(args)} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values)


def measure(path: Path, backends: list[str], repeat: int, no_gc: bool) -> dict[str, Any]:
    """Median figures for tomli, tomllib and every backend's four stages on `path`."""
    samples: dict[str, list[dict[str, Any]]] = {"tomli": [], "tomllib": []}
    for i in range(max(repeat, PARSE_RUNS)):  # alternating, against drift on a busy host
        for parser in ("tomli", "tomllib") if i % 2 == 0 else ("tomllib", "tomli"):
            samples[parser].append(_run(no_gc, "parse", str(path), parser))
    parsers = {
        parser: {
            **{c: _median([g[c] for g in got]) for c in CLOCKS},
            "rss_mib": _median([g["rss_kib"] for g in got]) / 1024,
            "runs": len(got),
        }
        for parser, got in samples.items()
    }
    per_backend: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for _ in range(repeat):  # interleaved too, so that a noisy minute hits every backend
        for backend in backends:
            per_backend[backend].append(_run(no_gc, "stages", str(path), backend))
    results: dict[str, Any] = {}
    for backend, got in per_backend.items():
        results[backend] = {
            **{c: {s: _median([g[c][s] for g in got]) for s in STAGES} for c in CLOCKS},
            "total": {c: _median([sum(g[c].values()) for g in got]) for c in CLOCKS},
            "rss_mib": {s: _median([g["rss_kib"][s] for g in got]) / 1024 for s in STAGES},
            "base_mib": _median([g["base_kib"] for g in got]) / 1024,
            "peak_mib": _median([g["peak_kib"] for g in got]) / 1024,
            "output_bytes": got[0]["output_bytes"],
            "runs": len(got),
        }
    return {"parsers": parsers, "backends": results}


def _size(services: int, endpoints: int, seed: int, external: bool, tmp: Path) -> Path:
    text, counts = generate(services, endpoints, seed=seed, external=external)
    path = tmp / f"cluster-{services}x{endpoints}.toml"
    path.write_text(text, encoding="utf-8")
    print(
        f"\n== {counts.services} services x {endpoints} endpoints: {counts.ports} ports, "
        f"{counts.endpoints} endpoints, {counts.external} external; "
        f"{len(text.encode()) / 1e6:.1f} MB of TOML (seed {seed})"
    )
    return path


def report(figures: dict[str, Any]) -> None:
    """Print one size's figures as tables: seconds on each clock, then memory."""
    tomli, tomllib = figures["parsers"]["tomli"], figures["parsers"]["tomllib"]
    for clock in CLOCKS:
        print(
            f"{clock:>4}: tomli alone {tomli[clock]:.3f} s, tomllib alone {tomllib[clock]:.3f} s"
            f" (tomllib/tomli {tomllib[clock] / tomli[clock]:.2f}x; median of {tomli['runs']})"
        )
    head = ["backend", "clock", *STAGES, "total", "total/tomli", "peak MiB", "output MB"]
    print("  ".join(f"{h:>11}" for h in head))
    for backend, r in figures["backends"].items():
        for clock in CLOCKS:
            row = [
                backend,
                clock,
                *(f"{r[clock][s]:.3f}" for s in STAGES),
                f"{r['total'][clock]:.3f}",
                f"{r['total'][clock] / tomli[clock]:.2f}x",
                f"{r['peak_mib']:.0f}",
                f"{r['output_bytes'] / 1e6:.1f}",
            ]
            print("  ".join(f"{c:>11}" for c in row))
    print("memory: high-water increase per stage, MiB (peak includes interpreter and imports)")
    for backend, r in figures["backends"].items():
        stages = ", ".join(f"{s} +{r['rss_mib'][s]:.0f}" for s in STAGES)
        print(f"  {backend}: start {r['base_mib']:.0f}, {stages}, peak {r['peak_mib']:.0f}")


def linearity(small: dict[str, Any], big: dict[str, Any], factor: float) -> bool:
    """Print big/small time ratios (CPU clock); True if every total is within target."""
    limit = TARGET_LINEAR * factor / 10
    print(f"\n== linearity, cpu clock: {factor:g}x the services (target: total <= {limit:.1f}x)")
    ok = True
    for backend, b in big["backends"].items():
        s = small["backends"][backend]
        ratios = ", ".join(f"{st} {b['cpu'][st] / max(s['cpu'][st], 1e-9):.1f}x" for st in STAGES)
        total = b["total"]["cpu"] / s["total"]["cpu"]
        ok = ok and total <= limit
        print(f"  {backend}: total {total:.1f}x ({ratios})")
    return ok


def _load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    """Generate the cluster(s), run the workers, print the figures; 1 if a target is missed."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        if argv[1:2] == ["--no-gc"]:
            gc.disable()
            argv = argv[1:]
        kind, path, arg = argv[1:4]
        result = _worker_parse(path, arg) if kind == "parse" else _worker_stages(path, arg)
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per service")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--external", action="store_true", help="add NodePort/LoadBalancers")
    parser.add_argument(
        "--backend",
        action="append",
        help="backend to measure (repeatable; default: every registered backend, ir included)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument(
        "--linearity", action="store_true", help="also measure a tenth of the services"
    )
    parser.add_argument(
        "--no-gc", action="store_true", help="disable the cyclic GC in every run (its share)"
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)

    import lbc

    names = args.backend or lbc.backend_names()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {_load()}; lbc "
        f"{lbc.__version__}; backends: {', '.join(names)}; {args.repeat} runs each, each in "
        f"a fresh process{'; cyclic GC disabled' if args.no_gc else ''}"
    )
    ok = True
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [args.services]
        if args.linearity:
            sizes.insert(0, max(1, args.services // 10))
        for services in sizes:
            toml = _size(services, args.endpoints, args.seed, args.external, Path(tmp))
            figures = measure(toml, names, args.repeat, args.no_gc)
            report(figures)
            out[str(services)] = figures
    big = out[str(args.services)]
    for r in big["backends"].values():
        ratio = r["total"]["cpu"] / big["parsers"]["tomli"]["cpu"]
        if ratio > TARGET_RATIO or r["peak_mib"] > TARGET_PEAK_MIB:
            ok = False
    if args.linearity:
        ok = linearity(out[str(sizes[0])], big, args.services / sizes[0]) and ok
    print(
        f"\n{_load()}; targets (cpu total <= {TARGET_RATIO:g}x tomli, peak < "
        f"{TARGET_PEAK_MIB} MiB{', linear' if args.linearity else ''}): "
        f"{'met' if ok else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
