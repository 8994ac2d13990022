"""Tuning A/B: tune the same mix once per setting ("arm"), then time the bundles side by side.

    python benchmarks/tuning_ab.py --models resnet50 squeezenet --arms sized previous --minutes 6 \
        > benchmarks/results/search-size-resnet_squeeze.txt
    python benchmarks/tuning_ab.py --models squeezenet --arms sized transfer --trials 4

Arms: ``sized`` (cosched's defaults), ``previous`` (the search sizes cosched used before
``SearchSize``), ``transfer`` (defaults plus record transfer), ``flush`` (defaults, candidates timed
with the weights flushed from the caches). With ``--minutes`` every arm gets the
same time budget through ``cosched.tune`` (its ladder: 2 trials per workload, then 8, ... up to
``--trials``, costliest first); without, every arm gets ``--trials`` per workload. Same seed; the databases go to
temporary folders. Bundles alternate in one process (medians), next to ONNX Runtime one model after
another on the same inputs.
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TVM_BIND_THREADS", "0")

import cosched
from cosched import bench
from cosched.compare import cosched_contender, load_models, make_inputs
from cosched.passes import LowerKernels
from cosched.target import host_target
from cosched.tuning import PREVIOUS_SEARCH_SIZE, SearchSize, tune, tune_modules

ARMS = {
    "sized": {},
    "previous": {"search": PREVIOUS_SEARCH_SIZE},
    "transfer": {"transfer": True},
    "flush": {"cache_flush": True},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["squeezenet"])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["sized", "previous"])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--minutes", type=float, help="the same time budget for every arm (else: equal trials)")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    target = host_target()
    threads = os.cpu_count() or 1
    models = load_models(args.models)
    tenants = [cosched.load_onnx(m, name=n) for n, m in models.items()]
    inputs = make_inputs(tenants)
    mods = None if args.minutes else [LowerKernels(target)(t.mod) for t in tenants]
    lines, contenders = [], []
    with tempfile.TemporaryDirectory(prefix="cosched-ab-") as tmp, bench.closing(contenders):
        for arm in args.arms:
            work = os.path.join(tmp, arm)
            options = {"search": SearchSize(), **ARMS[arm]}
            if args.minutes:
                r = tune(tenants, target, work, args.trials, args.minutes * 60, progress=False, **options)
            else:
                r = tune_modules(
                    mods, target, work, trials_per_task=args.trials, names=list(models), progress=False, **options
                )
            lines.append(
                f"{arm}: {options['search']}, transfer={options.get('transfer', False)}, "
                f"cache_flush={options.get('cache_flush', False)}\n"
                f"  {len(r.best_us)} of {r.tasks_deduped} workloads tuned, {r.trials_run} trials "
                f"({r.trials_transferred} on transferred schedules) in {r.seconds / 60:.1f} min"
            )
            bundle = cosched.compile(tenants, database=work, cores=threads)
            contenders.append(cosched_contender(f"cosched-{arm}", bundle, inputs))
        contenders.append(bench.ort_sequential(models, inputs, threads))
        results = bench.measure(contenders, repeat=args.repeat, warmup=2)
    budget = f"{args.minutes:g} min per arm" if args.minutes else f"{args.trials} trials per workload"
    print(bench.header(threads, target) + f"\nmodels  : {', '.join(models)}; {budget}")
    print("\n".join(lines))
    print(bench.format_table(results, contenders[0].name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
