"""What idle TVM pool workers' spinning costs a bundle on one stream and on several: latency, system time, switches.

    python benchmarks/spin_streams.py --mix demo --counts 300000 2000 0 --rounds 2 \
        > benchmarks/results/spin-streams-demo.txt

TVM reads ``TVM_THREAD_POOL_SPIN_COUNT`` once per process (300000 is TVM's default), so each count
runs in its own process, the counts alternating. Each
process times the mix's tuned bundle under three schedules, one after another with a pause, and
reports per run: wall time, user and system CPU time of the process, and its context switches
(involuntary ones are mostly spinning workers' ``sched_yield``). Compare counts within a round.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TVM_BIND_THREADS", "0")

SCHEDULES = {"sequential/1": ("sequential", 1, "tenant"), "round_robin/3 tenant": ("round_robin", 3, "tenant")}
SCHEDULES["breadth_first/3 balanced"] = ("breadth_first", 3, "balanced")


def worker(mix: str, threads: int, runs: int) -> None:
    import cosched
    from cosched.compare import MIXES, load_models, make_inputs, shipped_database
    from cosched.compiler import reschedule
    from cosched.target import host_target

    tenants = [cosched.load_onnx(m, name=n) for n, m in load_models(MIXES[mix]).items()]
    bundle = cosched.compile(tenants, target=host_target(threads), database=shipped_database(mix), cores=threads)
    inputs = make_inputs(tenants)
    out = {}
    for label, (strategy, streams, policy) in SCHEDULES.items():
        b = reschedule(bundle, strategy, streams, policy=policy)
        for _ in range(3):
            b.run(inputs)
        time.sleep(0.5)  # let the previous schedule's workers go to sleep
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(runs):
            b.run(inputs)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        out[label] = {
            "ms": 1e3 * (t1 - t0) / runs,
            "user_ms": 1e3 * (r1.ru_utime - r0.ru_utime) / runs,
            "sys_ms": 1e3 * (r1.ru_stime - r0.ru_stime) / runs,
            "involuntary": (r1.ru_nivcsw - r0.ru_nivcsw) / runs,
            "voluntary": (r1.ru_nvcsw - r0.ru_nvcsw) / runs,
        }
    print(json.dumps(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--counts", nargs="+", default=["300000", "2000", "0"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.mix, args.threads, args.runs)
        return 0

    from cosched import bench
    from cosched.target import host_target

    print(bench.header(args.threads, host_target(args.threads)))
    print(f"mix     : {args.mix}; {args.runs} runs per schedule per process; one process per count and round\n")
    print(f"{'round':<6}{'spin':>8}  {'schedule':<26}{'ms/run':>8}{'user ms':>9}{'sys ms':>8}{'invol.':>9}{'vol.':>7}")
    for round_ in range(args.rounds):
        order = args.counts[round_ % len(args.counts) :] + args.counts[: round_ % len(args.counts)]
        for count in order:
            env = {**os.environ, "TVM_THREAD_POOL_SPIN_COUNT": count, "TVM_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, __file__, "--worker", "--mix", args.mix, "--threads", str(args.threads)]
            cmd += ["--runs", str(args.runs)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            for label, r in json.loads(out.strip().splitlines()[-1]).items():
                print(
                    f"{round_:<6}{count:>8}  {label:<26}{r['ms']:8.2f}{r['user_ms']:9.2f}{r['sys_ms']:8.2f}"
                    f"{r['involuntary']:9.0f}{r['voluntary']:7.0f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
