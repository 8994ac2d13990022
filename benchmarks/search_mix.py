"""Learned co-schedule search on a tuned mix; the winner is stored next to the mix's database.

    python benchmarks/search_mix.py --mix demo > benchmarks/results/cpu-search-demo.txt

The search keeps its cost model and winner in databases/<cpu>/<mix>/search/, so later searches
start from the model and benchmarks/compare.py runs the winner as cosched-search.
"""

import argparse
import os
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

import cosched
from cosched import bench
from cosched.compare import MIXES, load_mix
from cosched.target import host_target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    database, models, tenants = load_mix(args.mix)
    threads = os.cpu_count() or 1
    searched = cosched.compile(
        tenants,
        database=database,
        schedule="search",
        cores=threads,
        search_options={
            "work_dir": database / "search",
            "generations": args.generations,
            "repeat": args.repeat,
            "log": print,
        },
    )
    print(bench.header(threads, host_target()) + f"\nmodels  : {', '.join(models)}")
    print(searched.search_report.summary())
    print(searched.schedule.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
