"""How far apart the co-schedule search measures one schedule against itself, per settle pause.

    python benchmarks/search_noise.py --mix demo > benchmarks/results/search-noise-demo.txt

Six copies of the sequential schedule (each its own bundle, as the search builds one per candidate)
are measured with ``cosched.search.measure`` at each settle pause. Identical schedules should come
out equal: the spread (max / min of the medians) is the noise floor the search's ranking works on.
"""

import argparse
import os
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

import cosched
from cosched import bench, search
from cosched.compare import MIXES, load_models, make_inputs, shipped_database
from cosched.target import host_target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--settle", type=float, nargs="+", default=[0.1, 0.3])
    args = parser.parse_args()
    models = load_models(MIXES[args.mix])
    tenants = [cosched.load_onnx(m, name=n) for n, m in models.items()]
    inputs = make_inputs(tenants)
    threads = os.cpu_count() or 1
    bundle = cosched.compile(tenants, database=shipped_database(args.mix), cores=threads)
    sequential = search.sequential_schedule(bundle.schedule)
    print(bench.header(threads, host_target()) + f"\nmodels  : {', '.join(models)}")
    print(f"{args.copies} copies of the sequential schedule, {args.repeat} alternating runs each, medians in ms")
    for settle in args.settle:
        ms = search.measure(bundle, [sequential] * args.copies, inputs, repeat=args.repeat, settle_s=settle)
        print(f"settle {settle:.2f} s: {' '.join(f'{m:7.2f}' for m in ms)}   max/min {max(ms) / min(ms):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
