"""Learned co-schedule search on a tuned mix, then the winner against the fixed strategies and the peers.

    python benchmarks/search_mix.py --mix demo > benchmarks/results/cpu-search-demo.txt

The search keeps its cost model in databases/<cpu>/<mix>/search/ so later runs start from it.
"""

import argparse
import os
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

import cosched
from cosched import bench
from cosched.compare import cosched_contender, load_models, make_inputs, shipped_database
from cosched.compiler import reschedule
from cosched.target import host_target

MIXES = {"demo": ("squeezenet", "shufflenet", "inception_v1"), "resnet_squeeze": ("resnet50", "squeezenet")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    database = shipped_database(args.mix)
    if database is None:
        print(f"no shipped database for {args.mix} on this CPU: tune it first", file=sys.stderr)
        return 1
    threads = os.cpu_count() or 1
    models = load_models(MIXES[args.mix])
    tenants = [cosched.load_onnx(m, name=n) for n, m in models.items()]
    inputs = make_inputs(tenants)
    searched = cosched.compile(
        tenants,
        database=database,
        schedule="search",
        cores=threads,
        search_options={"work_dir": database / "search", "generations": args.generations, "log": print},
    )
    print(searched.search_report.summary())
    print(searched.schedule.summary())
    target = host_target()
    contenders = [
        bench.relax_vm_sequential(tenants, inputs, target, threads, database),
        bench.relax_vm_concurrent(tenants, inputs, target, threads, database),
        cosched_contender("cosched-search", searched, inputs),
    ]
    for strategy, streams in (("sequential", 1), ("breadth_first", None)):
        label = f"cosched-{strategy}-{streams or 'per-tenant'}"
        contenders.append(cosched_contender(label, reschedule(searched, strategy, streams, cores=threads), inputs))
    contenders += [bench.ort_sequential(models, inputs, threads), bench.ort_concurrent(models, inputs, threads)]
    try:
        results = bench.measure(contenders, repeat=args.repeat, warmup=2)
    finally:
        for c in contenders:
            if c.close is not None:
                c.close()
    print(bench.header(threads, target) + f"\nmodels  : {', '.join(models)}; database {database}")
    print(bench.format_table(results, "relax-vm-seq"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
