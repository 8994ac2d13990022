"""How long idle TVM pool workers spin (TVM_THREAD_POOL_SPIN_COUNT) against the bundles' and the VM's latency.

    python benchmarks/spin_count.py --mix demo --counts default 0 1000 30000 --rounds 3

TVM reads the spin count once per process, so each setting runs in its own process; the processes
alternate (one per setting per round), and each times every contender of `compare` on the same
inputs. Times are reported relative to ONNX Runtime one after another *in the same process*, which
does not use TVM's pool: a ratio that moves with the setting is the setting's effect, machine drift
between processes cancels.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

ANCHOR = "ort-seq"


def worker(mix: str, threads: int, repeat: int) -> None:
    from cosched.compare import MIXES, compare, load_models, shipped_database

    result = compare(
        load_models(MIXES[mix]),
        threads=threads,
        database=shipped_database(mix),
        strategies=["sequential"],
        repeat=repeat,
        per_model=False,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    print(json.dumps({r.name: r.median_ms for r in result.results}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo")
    parser.add_argument("--counts", nargs="+", default=["default", "0", "1000", "30000"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.mix, args.threads, args.repeat)
        return 0

    from cosched import bench
    from cosched.target import host_target

    ratios: dict[str, dict[str, list[float]]] = {c: {} for c in args.counts}
    for round_ in range(args.rounds):
        # Rotate the order so that no setting always runs first (or right after the same one).
        order = args.counts[round_ % len(args.counts) :] + args.counts[: round_ % len(args.counts)]
        for count in order:
            env = dict(os.environ)
            env.pop("TVM_THREAD_POOL_SPIN_COUNT", None)
            if count != "default":
                env["TVM_THREAD_POOL_SPIN_COUNT"] = count
            cmd = [sys.executable, __file__, "--worker", "--mix", args.mix, "--threads", str(args.threads)]
            cmd += ["--repeat", str(args.repeat)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            medians = json.loads(out.strip().splitlines()[-1])
            for name, ms in medians.items():
                ratios[count].setdefault(name, []).append(ms / medians[ANCHOR])
            print(f"round {round_} spin {count}: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()), flush=True)

    print(bench.header(args.threads, host_target()))
    print(f"mix     : {args.mix}; {args.rounds} rounds of one process per setting, {args.repeat} runs per contender")
    names = list(next(iter(ratios.values())))
    print(f"\nmedian over rounds of (contender ms / {ANCHOR} ms in the same process); lower is faster")
    print(f"{'contender':<28}" + "".join(f"{'spin ' + c:>14}" for c in args.counts))
    for name in names:
        print(f"{name:<28}" + "".join(f"{statistics.median(ratios[c][name]):>14.3f}" for c in args.counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
