"""Comparison script: every contender of each mix in one process, alternating runs, ratios to the VM.

    python benchmarks/compare.py --mix demo --threads 2 --repeat 10 > benchmarks/results/cpu-demo.txt

Each mix uses the MetaSchedule database shipped for this CPU under databases/<cpu>/<mix> when one
exists, and says so in its header; a schedule stored there by benchmarks/search_mix.py runs as
cosched-search.
"""

import argparse
import os
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

from cosched.compare import MIXES, compare, load_models, shipped_database


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", nargs="+", default=["demo"], choices=list(MIXES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--untuned", action="store_true", help="ignore shipped databases")
    args = parser.parse_args()
    for mix in args.mix:
        database = None if args.untuned else shipped_database(mix)
        result = compare(
            load_models(MIXES[mix]),
            threads=args.threads,
            database=database,
            repeat=args.repeat,
            log=lambda m: print(m, file=sys.stderr),
        )
        print(f"== mix {mix}: {'database ' + str(database) if database else 'UNTUNED kernels'}")
        print(result.report())
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
