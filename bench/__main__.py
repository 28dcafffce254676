"""python -m bench [--quick] [--sizes ...] [--profiles ...] [--repeat N] [--burst N] [--burst-profiles ...] [--json PATH]

`make bench`: the service's whole job against the plain MONAI script per size and profile,
bursts, memory and cold start, in one go (see bench.suite); prints Markdown tables and writes
every figure as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench import report
from bench.suite import SIZES, Plan, Results, run
from schemas.jobs import Profile

QUICK = Plan(
    sizes=("256x256x128",),
    profiles=(Profile.FAST_DEBUG, Profile.PRODUCTION),
    burst_jobs=8,
    burst_profiles=(Profile.FAST_DEBUG,),
)
FULL = Plan(sizes=tuple(SIZES), profiles=(Profile.FAST_DEBUG, Profile.PRODUCTION), burst_jobs=20)


def _plan(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL
    return Plan(
        sizes=tuple(args.sizes or base.sizes),
        profiles=tuple(Profile(p) for p in args.profiles) if args.profiles else base.profiles,
        repeat=args.repeat,
        burst_jobs=args.burst or base.burst_jobs,
        burst_profiles=tuple(Profile(p) for p in args.burst_profiles) if args.burst_profiles else base.burst_profiles,
    )


def print_report(results: Results, seconds: float) -> None:
    machine = results.machine
    print(
        f"\nmachine: {machine['cores']} cores, CPU flags {' '.join(machine['cpu_flags'])}, torch threads "
        f"{machine['torch_threads']}; load average {_load(machine['load_average_start'])} at the start, "
        f"{_load(machine.get('load_average_end'))} at the end; the whole run took {seconds / 60:.1f} min"
    )
    replicas = list(results.idle_rss) or ["fp32", "auto"]
    sections = [
        ("Whole job: service (message -> completed event) vs the plain MONAI script, seconds",
         report.comparison_table(results.jobs, results.plains, replicas)),
        ("Stage split, seconds (the service's infer step split by the engine)",
         report.split_table(results.jobs, results.plains, replicas)),
        ("fast_debug against production (whole job, same scan and replica)",
         report.profile_table(results.jobs, replicas)),
        ("Bursts", report.burst_table(results.bursts)),
        ("Memory (RSS of the replica process)", report.memory_table(results.jobs, results.idle_rss)),
        ("Cold start", report.cold_start_table(results.cold_starts)),
        ("Runtime chosen per bundle at load", report.runtime_table(results.runtimes)),
    ]  # fmt: skip
    for title, table in sections:
        print(f"\n{title}\n\n{table}")


def _load(values: object) -> str:
    return " ".join(f"{v:.2f}" for v in values) if isinstance(values, list | tuple) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256x256x128 only and a burst of 8 (a few minutes)")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES))
    parser.add_argument("--profiles", nargs="+", choices=[p.value for p in Profile])
    parser.add_argument("--repeat", type=int, default=1, help="jobs (and plain runs) per size and profile")
    parser.add_argument("--burst", type=int, help="jobs in the burst (default 20, 8 with --quick)")
    parser.add_argument(
        "--burst-profiles",
        nargs="+",
        choices=[p.value for p in Profile],
        help="a burst of each (default fast_debug and production; fast_debug with --quick)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    args = parser.parse_args()
    plan = _plan(args)
    started = time.perf_counter()
    print(f"bench: sizes {', '.join(plan.sizes)}; profiles {', '.join(p.value for p in plan.profiles)}")
    with tempfile.TemporaryDirectory(prefix="ml-bench-") as tmp:
        results = asyncio.run(run(plan, Path(tmp)))
    seconds = time.perf_counter() - started
    results.machine["seconds"] = round(seconds, 1)
    print_report(results, seconds)
    args.json.write_text(json.dumps(results.as_json(), indent=1, default=str))
    print(f"\nevery figure: {args.json}")


if __name__ == "__main__":
    main()
