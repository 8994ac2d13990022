"""Where a deep tuning pass finds its gains, and what early-stop rules would have kept of them.

    python benchmarks/patience_depth.py --models inception_v2 --work-dir databases/znver4/dense_incv2_alex \
        --trials 512 --tasks 16 --budget 45 > benchmarks/results/patience-deep-inception_v2.txt

One pass without early stop (``patience=None``) on the ``--tasks`` costliest workloads that have
fewer than ``--trials`` trials. The database keeps every measured record until the end, so the
pass's records are then read back in the order they were measured and each workload's run is
replayed under early-stop rules: after how many trials it would have stopped and how far its best
would then be from the pass's best. (A replay is approximate: a task that stops early searches in
smaller batches, so it would not have measured exactly these candidates.) The database is compacted
at the end, as ``cosched tune`` does.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_BIND_THREADS", "0")

import numpy as np

import cosched
from cosched import bench
from cosched.compare import load_models
from cosched.passes import LowerKernels
from cosched.target import host_target
from cosched.tuning import MIN_GAIN, depth_patience, early_stop_step, extract_tasks, tune_modules
from cosched.tuning_db import META_FILE, RECORD_FILE, WORKLOAD_FILE, compact_database, open_database


def replay(start_us: float, times_us: list[float], patience: int) -> tuple[int, float]:
    """Trials a task would have run with ``patience`` (checked after each batch of ``patience // 2``, as
    ``tune_modules`` does) and the best latency it would have reached."""
    best, stale, batch = start_us, 0, max(1, patience // 2)
    for i in range(0, len(times_us), batch):
        chunk = times_us[i : i + batch]
        valid = [us for us in chunk if us != float("inf")]
        best, stale = early_stop_step(best, stale, valid, len(chunk), MIN_GAIN)
        if stale >= patience:
            return i + len(chunk), best
    return len(times_us), best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--work-dir", type=Path, required=True, help="a tuned database (deepened in place)")
    parser.add_argument("--trials", type=int, default=512, help="trials per workload after the pass")
    parser.add_argument("--tasks", type=int, default=16, help="workloads in the pass, costliest first")
    parser.add_argument("--budget", type=float, default=45, help="minutes")
    parser.add_argument("--rules", type=int, nargs="+", default=[16, 32, 64, 128])
    args = parser.parse_args()
    target = host_target()
    print(bench.header(os.cpu_count() or 1, target))
    models = load_models(args.models)
    tenants = [cosched.load_onnx(m, name=n) for n, m in models.items()]
    mods = [LowerKernels(target)(t.mod) for t in tenants]
    tasks = extract_tasks(mods, target, list(models))
    trials_had = json.loads((args.work_dir / META_FILE).read_text()).get("trials", {})
    had = {t.key: trials_had.get(t.key, 0) for t in tasks}
    first_new = len((args.work_dir / RECORD_FILE).read_text().splitlines())
    start = time.monotonic()
    report = tune_modules(
        mods,
        target,
        args.work_dir,
        trials_per_task=args.trials,
        time_budget_s=args.budget * 60,
        names=list(models),
        progress=False,
        max_tasks=args.tasks,
        patience=None,
        database=open_database(args.work_dir),
    )
    minutes = (time.monotonic() - start) / 60
    lines = (args.work_dir / RECORD_FILE).read_text().splitlines()
    shashes = [int(json.loads(w)[0]) for w in (args.work_dir / WORKLOAD_FILE).read_text().splitlines() if w]
    by_shash = {int(t.key, 16): t for t in tasks}
    before: dict[str, float] = {}
    measured: dict[str, list[float]] = {}
    for i, line in enumerate(lines):
        workload, (_, run_secs, *_) = json.loads(line)
        task = by_shash.get(shashes[workload])
        if task is None:
            continue
        us = float(np.mean(run_secs)) * 1e6 if max(run_secs) < 1e9 else float("inf")
        if i < first_new:
            before[task.key] = min(before.get(task.key, float("inf")), us)
        else:
            measured.setdefault(task.key, []).append(us)
    compact_database(args.work_dir)
    print(f"pass: {report.tasks_tuned} workloads, {report.trials_run} trials, {minutes:.1f} min, no early stop")
    rules = {f"p={p}": (lambda had, p=p: p) for p in args.rules}
    rules["p=max(16,had/2)"] = lambda had: depth_patience(16, had)
    print(f"  {'workload':44} {'had':>4} {'new':>4} {'us before':>9} {'after':>8} {'gain':>6}  gains >=2% at trial")
    gained: dict[str, list[float]] = {name: [] for name in rules}
    spent: dict[str, int] = dict.fromkeys(rules, 0)
    total_gain = 0.0
    by_key = {t.key: t for t in tasks}
    for key, times in measured.items():
        task = by_key[key]
        if key not in before:  # new to the database: its first measurement is where it starts
            before[key], times = times[0], times[1:]
        start_us = before[key]
        best, at = start_us, []
        for i, us in enumerate(times):
            if us < best * (1 - MIN_GAIN):
                at.append(i + 1)
            best = min(best, us)
        saved_us = (start_us - best) * task.weight
        total_gain += saved_us
        print(
            f"  {task.name[:44]:44} {had[key]:>4} {len(times):>4} {start_us:9.1f} {best:8.1f} "
            f"{(1 - best / start_us) * 100:5.1f}%  {at}"
        )
        for name, rule in rules.items():
            n, reached = replay(start_us, times, rule(had[key]))
            gained[name].append((start_us - reached) * task.weight)
            spent[name] += n
    trials = sum(len(t) for t in measured.values())
    print(f"pass total: {total_gain / 1e3:.3f} ms per inference saved in {trials} trials")
    print("  rule (replayed)          trials   share   ms saved   share of the gain")
    for name in rules:
        saved = sum(gained[name])
        print(
            f"  {name:22} {spent[name]:>8} {spent[name] / trials:6.0%} {saved / 1e3:10.3f}   "
            f"{saved / total_gain if total_gain else 1:6.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
