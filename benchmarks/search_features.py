"""How well the co-schedule search's features rank schedules, checked against measurement.

    python benchmarks/search_features.py --mix demo > benchmarks/results/search-features-demo.txt

The fixed strategies and ``--random`` random edits of them (the search's own mutations) are measured
the way the search measures (alternated with the sequential schedule, ``cosched.search.measure``),
once with a fixed pause before each run and once pausing until the process is idle. Printed, for
each: the rank correlation (Spearman) of the simulated makespan and of the runtime's feature (core
time idle cores lend to other streams' loops, ``joined``, with cosched's parallel launcher; spinning
TVM pool workers, ``spin_exposed``, with ``--parallel tvm``) with the measured latency, and of the cost
model's leave-one-out predictions with all features and without those two, then every schedule's numbers.
"""

import argparse
import os
import random
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

import numpy as np

import cosched
from cosched import bench, search
from cosched.compare import MIXES, load_mix
from cosched.target import host_target


def leave_one_out(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman of each schedule's prediction by a cost model trained on all the others."""
    predicted = []
    for i in range(len(y)):
        model = search.CostModel()
        for j in range(len(y)):
            if j != i:
                model.add(x[j], y[j])
        model.fit()
        predicted.append(float(model.predict(x[i])[0]))
    return search.spearman(predicted, list(y))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--random", type=int, default=30, help="random edits of the fixed strategies")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--parallel", default="cosched", choices=["cosched", "tvm"], help="Bundle.parallel")
    args = parser.parse_args()
    database, _, tenants = load_mix(args.mix)
    threads = os.cpu_count() or 1
    bundle = cosched.compile(tenants, database=database, cores=threads)
    bundle.parallel = args.parallel
    joining = bundle.loops_on_helpers
    inputs = bundle.random_inputs()
    profile = search.profile_kernels(bundle, inputs)
    candidates = [(c.origin, c.schedule) for c in search.seeds(bundle)]
    rng = random.Random(args.seed)
    fixed = [s for _, s in candidates]
    for i in range(args.random):
        schedule = rng.choice(fixed)
        for _ in range(rng.randint(1, 4)):
            issue, stream_of, caps = search.mutate(schedule, rng)
            schedule = search.rebuild(schedule, issue, stream_of, caps, "edit")
        candidates.append((f"edit {i}, caps {[s.threads for s in schedule.streams]}", schedule))
    x = np.stack([search.features(s, profile, joining) for _, s in candidates])
    makespan, runtime = x[:, 4], x[:, -1 if joining else -2]
    label = "joined" if joining else "spin"
    sequential = search.sequential_schedule(bundle.schedule)
    print(bench.header(threads, host_target()))
    print(f"mix     : {args.mix}; {len(candidates)} schedules, {args.repeat} runs each, alternated with sequential")
    print(f"parallel: {bundle.parallel} (loops on the executor's helpers: {joining})")
    measured = {}
    # Both pauses in one process, on the same schedules: the fixed one is how the search measured before.
    for pause, quiet in (("fixed pause", False), ("pause until idle", True)):
        times = search.measure(
            bundle, [sequential] + [s for _, s in candidates], inputs, repeat=args.repeat, copies=3, quiet=quiet
        )
        y = measured[pause] = np.asarray(times[1:]) / times[0]
        print(f"\n{pause}: rank correlation (Spearman) with the measured latency relative to sequential")
        print(f"  simulated makespan                         {search.spearman(list(makespan), list(y)):.2f}")
        print(f"  simulated {label:<32} {search.spearman(list(runtime), list(y)):.2f}")
        print(f"  cost model, leave-one-out, all features    {leave_one_out(x, y):.2f}")
        print(f"  cost model, leave-one-out, without those   {leave_one_out(x[:, :-2], y):.2f}")
    print(f"\n{'fixed':>7} {'idle':>7} {'makespan':>9} {label:>6}  schedule (measured: latency relative to sequential)")
    for i, (name, _) in enumerate(candidates):
        fixed, idle = measured["fixed pause"][i], measured["pause until idle"][i]
        print(f"{fixed:7.3f} {idle:7.3f} {makespan[i]:9.3f} {runtime[i]:6.3f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
