"""A fixed pause before each measured run against a pause until the process is idle, in one process.

    python benchmarks/settle_ab.py --mix demo > benchmarks/results/settle-ab-demo.txt

The same contenders (the Relax VM one after another and concurrently, cosched's one-stream
sequential order, a fixed multi-stream strategy, the stored searched schedule) are timed in
alternating passes: ``bench.measure(..., quiet=False)`` pauses a fixed ``--settle`` before each run
(cosched's measurements before 2026-11-24), ``quiet=True`` pauses at least that long and then until
the process's threads are idle (``bench.settle``). A spinning pool left by one contender slows the
next, and not all alike, so the ratios between contenders are what to compare across the modes.
"""

import argparse
import os
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

import cosched
from cosched import bench
from cosched.compare import MIXES, cosched_contender, load_mix, make_inputs, sequential_baselines
from cosched.search import load_searched
from cosched.target import host_target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--repeat", type=int, default=10, help="rounds per pass")
    parser.add_argument("--passes", type=int, default=4, help="passes, alternating fixed and idle pauses")
    parser.add_argument("--settle", type=float, default=0.25)
    args = parser.parse_args()
    database, _, tenants = load_mix(args.mix)
    threads = os.cpu_count() or 1
    target = host_target()
    inputs = make_inputs(tenants)
    bundle, contenders, exes = sequential_baselines(tenants, inputs, database, threads)
    contenders += [
        bench.relax_vm_concurrent(tenants, inputs, target, threads, executables=exes, measure_memory=False),
        cosched_contender("cosched-breadth_first", cosched.reschedule(bundle, "breadth_first"), inputs),
        cosched_contender("cosched-search", load_searched(bundle, database / "search"), inputs),
    ]
    print(bench.header(threads, target))
    print(f"mix     : {args.mix}; {args.passes} passes of {args.repeat} rounds, settle {args.settle} s")
    print("speedup over relax-vm-seq in each pass (>1 faster), 95% bootstrap intervals\n")
    names = [c.name for c in contenders]
    print(f"{'pass':<6}{'pause':<7}" + "".join(f"{n:>26}" for n in names[1:]))
    with bench.closing(contenders):
        for p in range(args.passes):
            quiet = p % 2 == 1
            results = bench.measure(contenders, repeat=args.repeat, warmup=1, settle_s=args.settle, quiet=quiet, seed=p)
            base = results[0]
            cells = "".join(f"{format(bench.speedup(base, r), ''):>26}" for r in results[1:])
            print(f"{p:<6}{'idle' if quiet else 'fixed':<7}{cells}   (VM {base.median_ms:.1f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
