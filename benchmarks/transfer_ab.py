"""Record transfer A/B: tune the same mix twice, with and without transfer, then time both bundles.

    python benchmarks/transfer_ab.py --models squeezenet --trials 4 > benchmarks/results/transfer-squeezenet.txt

Same seed, same trials; the two databases go to temporary folders. Bundles alternate in one
process (medians), next to ONNX Runtime one after another on the same inputs.
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
from cosched.tuning import tune_modules


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["squeezenet"])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    target = host_target()
    threads = os.cpu_count() or 1
    models = load_models(args.models)
    tenants = [cosched.load_onnx(m, name=n) for n, m in models.items()]
    mods = [LowerKernels(target)(t.mod) for t in tenants]
    inputs = make_inputs(tenants)
    with tempfile.TemporaryDirectory(prefix="cosched-transfer-") as tmp:
        contenders, lines = [], []
        for transfer in (False, True):
            work = os.path.join(tmp, f"transfer-{transfer}")
            r = tune_modules(
                mods, target, work, trials_per_task=args.trials, names=list(models), progress=False, transfer=transfer
            )
            lines.append(
                f"transfer={transfer}: {r.tasks_tuned} tasks, {r.trials_run} trials "
                f"({r.trials_transferred} on transferred schedules) in {r.seconds / 60:.1f} min"
            )
            bundle = cosched.compile(tenants, database=work, cores=threads)
            contenders.append(cosched_contender(f"cosched-transfer-{'on' if transfer else 'off'}", bundle, inputs))
        contenders.append(bench.ort_sequential(models, inputs, threads))
        try:
            results = bench.measure(contenders, repeat=args.repeat, warmup=2)
        finally:
            for c in contenders:
                if c.close is not None:
                    c.close()
    print(bench.header(threads, target) + f"\nmodels  : {', '.join(models)}; {args.trials} trials per task")
    print("\n".join(lines))
    print(bench.format_table(results, "cosched-transfer-off"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
