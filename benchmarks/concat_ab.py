"""Concatenation in place against the copy kernel, each model alone on the Relax VM, with ONNX Runtime.

    python benchmarks/concat_ab.py --mix demo --models squeezenet inception_v1 --repeat 40 \
        > benchmarks/results/concat-ab-demo.txt

Per model: the mix's shipped database lowered twice, with ``ConcatInPlace`` (the default) and
without it (``concat_in_place=False``: the producers write their own tensors, a kernel copies them
into the concatenation), and ONNX Runtime's default session, all alternated in one process.
With ``--profile N``, each variant also runs N profiled times on cosched's executor (one stream,
alternated), and its kernels' time is printed by kind, as ``kernel_breakdown.py`` groups it.
"""

import os
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

import collections

import numpy as np
import tvm
from kernel_breakdown import table, tvm_kinds

import cosched
from cosched import bench
from cosched.compare import MIXES, load_models, make_inputs, model_parser, shipped_database
from cosched.passes import LowerKernels
from cosched.target import host_target


def profile(tenant, inputs, target, database, rounds: int, top: int = 8) -> None:
    """Kernel time by kind with and without concatenations in place, profiled alternately."""
    bundles = {
        label: cosched.build([tenant], target, "sequential", 1, database, concat_in_place=in_place).load()
        for label, in_place in (("copy", False), ("in-place", True))
    }
    samples = {label: collections.defaultdict(list) for label in bundles}
    for _ in range(rounds):
        for label, bundle in bundles.items():
            for kind, ms in tvm_kinds(bundle, inputs, 1)[0].items():
                samples[label][kind].append(ms)
    for label, kinds in samples.items():
        print(f"  {tenant.name}, {label}: kernel ms per inference (median of {rounds} profiled runs)")
        print("\n".join(table({k: float(np.median(v)) for k, v in kinds.items()}, top)))


def main() -> int:
    parser = model_parser(__doc__.splitlines()[0])
    parser.add_argument("--profile", type=int, default=0, help="profiled runs per variant (0: none)")
    args = parser.parse_args()
    database = shipped_database(args.mix)
    threads = args.threads or os.cpu_count() or 1
    target = host_target(threads)
    print(bench.header(threads, target))
    print(f"database: {database or 'none (untuned kernels)'}; {args.repeat} rounds, alternated")
    models = load_models(args.models or MIXES[args.mix])
    rows = []
    for name, model in models.items():
        tenant = cosched.load_onnx(model, name=name)
        inputs = make_inputs([tenant])
        contenders = []
        for label, in_place in (("copy", False), ("in-place", True)):
            exe = tvm.compile(LowerKernels(target, database, concat_in_place=in_place)(tenant.mod), target=target)
            contenders.append(
                bench.relax_vm_sequential(
                    [tenant], inputs, target, threads, executables={name: exe}, name=label, measure_memory=False
                )
            )
        contenders.append(bench.ort_sequential({name: model}, inputs, threads, measure_memory=False, name="ort"))
        with bench.closing(contenders):
            copy, in_place = (c.run_once()[name][0] for c in contenders[:2])
            if not np.array_equal(copy, in_place):
                raise SystemExit(f"{name}: outputs differ by {np.abs(copy - in_place).max()}")
            results = {r.name: r for r in bench.measure(contenders, repeat=args.repeat)}
        rows.append((name, results))
    print(f"\n{'model':<14} {'copy ms':>8} {'in-place ms':>11} {'ORT ms':>8}  {'in-place speedup':<22} in-place/ORT")
    for name, r in rows:
        gain = bench.speedup(r["copy"], r["in-place"])
        over_ort = bench.speedup(r["in-place"], r["ort"])
        print(
            f"{name:<14} {r['copy'].median_ms:8.2f} {r['in-place'].median_ms:11.2f} {r['ort'].median_ms:8.2f}"
            f"  {gain:x}{'':<4} {over_ort:x}"
        )
    print("\nspeedup: copy / in-place medians; in-place/ORT: in-place time over ORT's (<= 1.0 is the goal);")
    print("[low-high]: 95% bootstrap interval over paired rounds.")
    if args.profile:
        print()
        for name, model in models.items():
            tenant = cosched.load_onnx(model, name=name)
            profile(tenant, make_inputs([tenant]), target, database, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
