"""How tuning times a kernel against how long it takes in the model: warm, flushed, cold, in the model.

    python benchmarks/cold_timing.py --mix resnet_squeeze --model resnet50 --top 16 \
        > benchmarks/results/cold-timing-resnet50-znver5.txt

Each of the model's costliest workloads (by weight x best recorded time), its best record in the
mix's shipped database built once and timed by MetaSchedule's runner on all cores, three ways:
``warm`` (the default EvaluatorConfig: runs repeated for 100 ms), ``flush-per-100ms`` (the default
with ``enable_cpu_cache_flush``, as ``cosched tune --cache-flush`` timed until 2026-11-24: TVM
flushes once per repeat, so all runs but the first are warm) and ``cold``
(``tuning_measure.cold_evaluator()``: one run per flush). ``in model``: the same kernel's median time in
``Bundle.profile`` of the model alone, compiled with that database (a mean until 2026-11-24, which
the runs a neighbour slowed pulled up: ResNet-50's kernels summed 22.0 ms in the model that way, and
19.2-19.4 ms as medians in ``kernel_breakdown.py``'s profiles on the same database).
"""

import argparse
import collections
import os
import statistics
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

from kernel_breakdown import kernel_samples, kernel_workload
from tvm.s_tir import meta_schedule as ms

import cosched
from cosched import bench, tuning, tuning_db, tuning_measure
from cosched.compare import MIXES, load_mix, make_inputs
from cosched.passes import LowerKernels
from cosched.target import host_target

CONFIGS = {
    "warm": ms.runner.EvaluatorConfig(),
    "flush-per-100ms": ms.runner.EvaluatorConfig(enable_cpu_cache_flush=True),
    "cold": tuning_measure.cold_evaluator(),
}


def time_records(records, target, cores: int) -> dict[str, list[float | None]]:
    """Microseconds per run of each record under each of ``CONFIGS``."""
    runners = [tuning_measure.runner_on_cores(cores, c) for c in CONFIGS.values()]
    timed = tuning_measure.time_records(records, target, cores, runners)
    return {
        name: [None if isinstance(r, str) else tuning_measure.mean_us(r) for r in results]
        for name, results in zip(CONFIGS, timed, strict=True)
    }


def in_model_us(bundle, inputs, repeat: int) -> tuple[dict[str, float], float]:
    """Median microseconds per call of each workload's kernels in the model's profiles, and the
    milliseconds of all kernels per inference (each kernel's median summed): medians, as one run in
    ten on this shared machine can take twice as long."""
    per_kernel, funcs, _ = kernel_samples(bundle, inputs, repeat)
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for kernel, times in per_kernel.items():
        samples[kernel_workload(funcs[kernel])] += times
    total_ms = sum(statistics.median(v) for v in per_kernel.values()) / 1e3
    return {f: statistics.median(v) for f, v in samples.items()}, total_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="resnet_squeeze", choices=list(MIXES))
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--top", type=int, default=16, help="the N costliest workloads")
    parser.add_argument("--repeat", type=int, default=10, help="profiled runs of the model")
    args = parser.parse_args()
    target = host_target()
    cores = tuning_measure.num_cores(target)
    database, _, tenants = load_mix(args.mix)
    tenant = next(t for t in tenants if t.name == args.model)
    tasks = tuning.extract_tasks([LowerKernels(target)(tenant.mod)], target, [tenant.name])
    db = tuning_db.open_database(database)
    tasks = [t for t in tasks if tuning_db.best_us(db, t) is not None]
    tasks.sort(key=lambda t: -t.weight * tuning_db.best_us(db, t))
    tasks = tasks[: args.top]
    times = time_records([tuning_db.best_record(db, t) for t in tasks], target, cores)
    bundle = cosched.compile([tenant], database=database, cores=cores)
    model, model_ms = in_model_us(bundle, make_inputs([tenant]), args.repeat)

    print(bench.header(cores, target))
    print(
        f"database: {database}; {args.model}'s {len(tasks)} costliest workloads; in model: {args.repeat} profiled runs"
    )
    print(
        f"cold: {tuning_measure.COLD_RUNS} runs, each after a flush; others: MetaSchedule's default (runs for 100 ms)"
    )
    heads = [*CONFIGS, "in model"]
    print(f"{'workload (us per call)':<42} {'n':>2} " + " ".join(f"{h:>15}" for h in heads) + "  cold/warm model/warm")
    sums = dict.fromkeys(heads, 0.0)
    for i, task in enumerate(tasks):
        func = task.name.split(".", 1)[1]
        row = [times[h][i] for h in CONFIGS] + [model.get(func)]
        for h, us in zip(heads, row, strict=True):
            sums[h] += task.weight * (us or 0.0)
        cells = " ".join(f"{us:15.1f}" if us else f"{'-':>15}" for us in row)
        warm, cold, inside = row[0], row[2], row[3]
        ratios = f"{cold / warm:10.2f} {inside / warm:10.2f}" if warm and cold and inside else ""
        print(f"{func[:42]:<42} {task.weight:2d} {cells}  {ratios}")
    print(f"{'sum x n (ms)':<42} {'':>2} " + " ".join(f"{sums[h] / 1e3:15.2f}" for h in heads))
    print(f"all kernels in the model's profile: {model_ms:.2f} ms per inference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
