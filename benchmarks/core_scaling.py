"""How much two cores can give a mix: each model alone on one core and on two, and the packing bound.

    python benchmarks/core_scaling.py --mix demo resnet_squeeze > benchmarks/results/core-scaling-znver5.txt

First a probe of the machine: a compute-bound single-threaded GEMM (cached operands) on one CPU,
then on both at once; ~2x says the two CPUs are cores of their own, ~1.2-1.3x would say SMT
siblings. Then, per mix, every model alone as a one-model bundle capped at 1 and at 2 cores, and
its sequential bundle on 2 cores, all alternated in one process. The bound: split the models into
two groups, each running on a core of its own until the smaller group is done, the rest of the
larger group then on both cores at its two-core speed; the best split's latency against the
sequential bundle is the most any co-schedule can gain from packing (overlap that hides memory
stalls could add a little).
"""

import argparse
import itertools
import multiprocessing as mp
import os
import sys
import time

os.environ.setdefault("TVM_BIND_THREADS", "0")

import numpy as np

import cosched
from cosched import bench
from cosched.compare import MIXES, cosched_contender, load_mix, make_inputs
from cosched.target import host_target

GEMM_N = 192  # three 192x192 float32 operands: 432 KiB, in each core's L2


def _gemm_rate(cpu: int, seconds: float, queue) -> None:
    os.sched_setaffinity(0, {cpu})
    a = np.random.default_rng(cpu).random((GEMM_N, GEMM_N), dtype=np.float32)
    b = a.T.copy()
    for _ in range(50):
        a @ b
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            a @ b
        calls += 50
    queue.put(calls * 2 * GEMM_N**3 / (time.perf_counter() - start) / 1e9)


def gemm_gflops(cpus: list[int], seconds: float = 3.0) -> list[float]:
    """GFLOP/s of a one-thread GEMM on each of ``cpus``, all running at once."""
    # One BLAS thread per process: set before the child imports numpy's BLAS.
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gemm_rate, args=(c, seconds, queue)) for c in cpus]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [queue.get() for _ in procs]


def packing_bound(one: dict[str, float], two: dict[str, float]) -> tuple[float, tuple[str, ...]]:
    """The best two-group split's latency (ms) and its first group (see the module docstring)."""
    names = list(one)
    best = (sum(two.values()), ())
    for size in range(1, len(names)):
        for group in itertools.combinations(names, size):
            rest = [n for n in names if n not in group]
            a, b = sum(one[n] for n in group), sum(one[n] for n in rest)
            big = group if a >= b else tuple(rest)
            longer, shorter = max(a, b), min(a, b)
            latency = shorter + (1 - shorter / longer) * sum(two[n] for n in big)
            best = min(best, (latency, group))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", nargs="+", default=["demo"], choices=list(MIXES))
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        print("needs two CPUs", file=sys.stderr)
        return 1
    print(bench.header(2, host_target()))
    alone = [gemm_gflops([c])[0] for c in (0, 1)]
    both = gemm_gflops([0, 1])
    print(
        f"one-thread GEMM {GEMM_N}x{GEMM_N}: alone {alone[0]:.1f} / {alone[1]:.1f} GFLOP/s; both at once "
        f"{both[0]:.1f} + {both[1]:.1f}: {sum(both) / (sum(alone) / 2):.2f}x one CPU's rate"
    )
    for mix in args.mix:
        database, _, tenants = load_mix(mix)
        contenders = []
        for tenant in tenants:
            inputs = make_inputs([tenant])
            for cores in (1, 2):
                bundle = cosched.compile([tenant], database=database, cores=cores)
                contenders.append(cosched_contender(f"{tenant.name} x{cores}", bundle, inputs))
        sequential = cosched.compile(tenants, database=database, schedule="sequential", num_streams=1, cores=2)
        contenders.append(cosched_contender("sequential bundle", sequential, make_inputs(tenants)))
        results = {r.name: r for r in bench.measure(contenders, repeat=args.repeat)}
        print(f"\n== {mix} ({database}); {args.repeat} rounds, medians [p25-p75] ms")
        for name, r in results.items():
            print(f"  {name:<22} {r.median_ms:8.2f} [{r.p25:.2f}-{r.p75:.2f}]")
        one = {t.name: results[f"{t.name} x1"].median_ms for t in tenants}
        two = {t.name: results[f"{t.name} x2"].median_ms for t in tenants}
        for t in tenants:
            print(f"  {t.name}: {one[t.name] / two[t.name]:.2f}x faster on two cores than on one")
        latency, group = packing_bound(one, two)
        seq = results["sequential bundle"].median_ms
        print(
            f"  packing bound: {latency:.2f} ms ({' + '.join(group) or 'no split'} on one core beside the rest), "
            f"{seq / latency:.2f}x the sequential bundle's {seq:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
