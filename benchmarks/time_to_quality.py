"""Time to quality: bundle latency against tuning minutes, for one mix.

    python benchmarks/time_to_quality.py --models resnet50 squeezenet --chunk 3 --minutes 15 \
        --work-dir databases/znver4/resnet_squeeze > benchmarks/results/ttq-resnet_squeeze.txt

Tuning is resumable, so it runs in chunks of ``--chunk`` minutes (first 2 trials per task, costliest
first, then 8, then 32 for the costliest) and the database is copied after each chunk. Afterwards the bundle
is compiled with every snapshot (kernels without a record stay untuned) and timed, alternating with
ONNX Runtime on the same inputs; the last snapshot is left compacted in ``--work-dir``.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_BIND_THREADS", "0")

import cosched
from cosched import bench
from cosched.compare import load_models, make_inputs
from cosched.passes import LowerKernels
from cosched.target import host_target
from cosched.tuning import trial_ladder, tune_modules
from cosched.tuning_db import compact_database, open_database

STEPS = trial_ladder(2, 32)
"""Trials per task as ``cosched.tune`` climbs them, raised once every task has the current number."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=24)
    parser.add_argument("--chunk", type=float, default=4)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    target = host_target()
    models = load_models(args.models)
    tenants = [cosched.load_onnx(m, name=n) for n, m in models.items()]
    mods = [LowerKernels(target)(t.mod) for t in tenants]
    snapshots = Path(tempfile.mkdtemp(prefix="ttq-"))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    database = open_database(args.work_dir)  # once: opening replays every record
    start = time.monotonic()
    points = []  # (minutes, snapshot dir)
    trials = STEPS[0]
    while (elapsed := time.monotonic() - start) < args.minutes * 60:
        budget = min(args.chunk * 60, args.minutes * 60 - elapsed)
        report = tune_modules(
            mods,
            target,
            args.work_dir,
            trials_per_task=trials,
            time_budget_s=budget,
            names=list(models),
            progress=False,
            database=database,
        )
        if report.tasks_left == 0 and report.tasks_tuned == 0:
            if trials == STEPS[-1]:
                break
            trials = STEPS[STEPS.index(trials) + 1]  # every task has these: more for the costliest
            continue
        snap = snapshots / f"{len(points)}"
        shutil.copytree(args.work_dir, snap)
        points.append(((time.monotonic() - start) / 60, snap, report.tasks_deduped - report.tasks_left))
        print(
            f"[{points[-1][0]:.1f} min] snapshot {len(points)}: {points[-1][2]}/{report.tasks_deduped} tasks "
            f"tuned with >= {trials} trials",
            file=sys.stderr,
            flush=True,
        )
    compact_database(args.work_dir, database=database)

    inputs = make_inputs(tenants)
    threads = os.cpu_count() or 1
    ort = bench.ort_sequential(models, inputs, threads)
    rows = [(0.0, None, 0), *points]
    contenders = {}
    for minutes, snap, tasks in rows:
        bundle = cosched.compile(tenants, target, database=snap, cores=threads)
        contenders[f"{minutes:5.1f} min ({tasks} tasks)"] = bundle
    timed = [bench.Contender(name, lambda b=b: b.run(inputs)) for name, b in contenders.items()]
    timed.append(bench.Contender("onnxruntime", ort.run))
    with bench.closing([ort]):
        results = bench.measure(timed, repeat=args.repeat, warmup=1)
    print(bench.header(threads, target))
    print(f"mix: {', '.join(models)}; cosched default schedule; {args.repeat} alternating runs, medians")
    ort_ms = results[-1].median_ms
    print(f"{'tuning time':<24} {'bundle ms':>10} {'p25-p75 ms':>18} {'vs ORT seq':>11}")
    for r in results:
        spread = f"{r.p25:.2f}-{r.p75:.2f}"
        print(f"{r.name:<24} {r.median_ms:>10.2f} {spread:>18} {r.median_ms / ort_ms:>10.2f}x")
    shutil.rmtree(snapshots, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
