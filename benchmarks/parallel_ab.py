"""Who runs the kernels' parallel loops: the executor's helper threads against TVM's per-thread pools.

    python benchmarks/parallel_ab.py --mix demo --repeat 20 > benchmarks/results/parallel-ab-demo.txt

One process, the same kernels: each schedule (cosched's one-stream order, the mix's stored searched
schedule, the fixed multi-stream strategies) runs once with ``Bundle.parallel = "cosched"`` and once
with ``"tvm"``, next to the Relax VM one after another, alternated in shuffled rounds with the
process idle before each run. Ratios over the VM with 95% intervals, and per contender the process's
CPU time and involuntary context switches per run (spinning workers yielding to each other).
"""

import argparse
import dataclasses
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("TVM_BIND_THREADS", "0")

from cosched import bench
from cosched.compare import MIXES, cosched_contender, load_mix, make_inputs, sequential_baselines
from cosched.compiler import reschedule
from cosched.search import load_searched
from cosched.target import host_target

FIXED = [("round_robin", 3, "tenant"), ("breadth_first", 3, "balanced")]


def counted(contender: bench.Contender, usage: dict) -> bench.Contender:
    """``contender`` that also adds up the process's CPU time and involuntary switches of its runs."""

    def run() -> None:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        contender.run()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        u = usage.setdefault(contender.name, [0, 0.0, 0])
        u[0] += 1
        u[1] += (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        u[2] += r1.ru_nivcsw - r0.ru_nivcsw

    return dataclasses.replace(contender, run=run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    database, _, tenants = load_mix(args.mix)
    threads = os.cpu_count() or 1
    inputs = make_inputs(tenants)
    bundle, contenders, _ = sequential_baselines(tenants, inputs, database, threads)
    contenders.pop()  # cosched-sequential-1: measured below under both runners
    schedules = {"sequential-1": reschedule(bundle, "sequential", 1)}
    stored = Path(database) / "search"
    if (stored / "searched_schedule.json").exists():
        schedules["searched"] = load_searched(bundle, stored)
    for strategy, streams, policy in FIXED:
        schedules[f"{strategy}-{streams}"] = reschedule(bundle, strategy, streams, policy=policy)
    for label, b in schedules.items():
        for parallel in ("tvm", "cosched"):
            view = b.with_schedule(b.schedule)
            view.parallel = parallel
            contenders.append(cosched_contender(f"{label} [{parallel}]", view, inputs))
    usage: dict = {}
    contenders = [counted(c, usage) for c in contenders]
    print(bench.header(threads, host_target()) + f"\nmix     : {args.mix}; {args.repeat} rounds")
    with bench.closing(contenders):
        results = bench.measure(contenders, repeat=args.repeat, warmup=2)
    print(f"\n{'contender':32}{'ms':>8}  {'over the VM':>24}  {'cpu ms/run':>10}  {'invol./run':>10}")
    for r in results:
        runs, cpu, invol = usage[r.name]
        print(
            f"{r.name:32}{r.median_ms:8.2f}  {format(bench.speedup(results[0], r), 'x'):>24}"
            f"  {1e3 * cpu / runs:10.1f}  {invol / runs:10.0f}"
        )
    for label in schedules:
        tvm, ours = (next(r for r in results if r.name == f"{label} [{p}]") for p in ("tvm", "cosched"))
        print(f"{label:24} cosched helpers over TVM pools {bench.speedup(tvm, ours):x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
