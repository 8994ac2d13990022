"""Stored searched schedules against each other, in one process: which one to ship.

    python benchmarks/searched_ab.py --mix dense_incv2_alex --dirs old/ new/ > benchmarks/results/searched-ab.txt

Each ``--dirs`` entry is a search ``work_dir`` (holding ``searched_schedule.json``), e.g. the
mix's ``search`` folder at an earlier revision (``git show REV:databases/...``) and after a new
search. They run on the same kernels next to the Relax VM one after another and cosched's
one-stream sequential order, alternated in shuffled rounds; ratios over the VM with 95% intervals.
"""

import argparse
import os
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

from cosched import bench
from cosched.compare import MIXES, cosched_contender, load_mix, make_inputs, sequential_baselines
from cosched.search import load_searched
from cosched.target import host_target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--dirs", nargs="+", required=True, help="search work dirs with a stored schedule")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    database, _, tenants = load_mix(args.mix)
    threads = os.cpu_count() or 1
    inputs = make_inputs(tenants)
    bundle, contenders, _ = sequential_baselines(tenants, inputs, database, threads)
    for i, work_dir in enumerate(args.dirs):
        searched = load_searched(bundle, work_dir)
        contenders.append(cosched_contender(f"searched-{i}", searched, inputs))
        streams = ", ".join(f"{s.threads}" for s in searched.schedule.streams)
        print(f"searched-{i}: {work_dir}: {searched.schedule.num_streams} stream(s), caps {streams}")
    print(bench.header(threads, host_target()) + f"\nmix     : {args.mix}; {args.repeat} rounds")
    with bench.closing(contenders):
        results = bench.measure(contenders, repeat=args.repeat, warmup=2)
    for r in results:
        print(f"{r.name:24} {r.median_ms:8.2f} ms   over the VM one after another {bench.speedup(results[0], r):x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
