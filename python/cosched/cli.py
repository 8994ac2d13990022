"""The ``cosched`` command: bench, compile, run, tune and the demo."""

from __future__ import annotations

import os

# Before anything imports TVM: pinning would serialize every worker thread on core 0.
os.environ.setdefault("TVM_BIND_THREADS", "0")

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import CoschedError

DEMO_MIX = ("squeezenet", "shufflenet", "inception_v1")
TUNED_SHOWN = 12
"""``cosched tune`` lists each tuned kernel's best time before and after when it tuned at most this many."""


def _bench(args: argparse.Namespace) -> int:
    from .compare import compare, load_models

    result = compare(
        load_models(args.models),
        threads=args.threads,
        database=args.database,
        strategies=args.strategies,
        num_streams=args.streams,
        repeat=args.repeat,
    )
    print(result.report())
    if args.json:
        from dataclasses import asdict

        from . import bench

        per_model = [
            {
                "model": m.name,
                "tvm": asdict(m.tvm),
                "ort": asdict(m.ort),
                "cosched": asdict(m.cosched),
                "tvm_over_ort": m.ratio.value,
                "tvm_over_ort_interval": m.ratio.interval,
                "cosched_over_ort": m.cosched_ratio.value,
                "cosched_over_ort_interval": m.cosched_ratio.interval,
            }
            for m in result.per_model
        ]
        data = {
            "header": result.header,
            "report": result.report(),
            "results": json.loads(bench.to_json(result.results, result.baseline)),
            "per_model": per_model,
        }
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


def _compile(args: argparse.Namespace) -> int:
    from .compare import load_models
    from .compiler import compile as compile_bundle
    from .tenant import load_onnx

    models = load_models(args.models)
    tenants = [load_onnx(m, name=n) for n, m in models.items()]
    # A searched schedule keeps its cost model next to the database, so later searches start from it.
    search = {"work_dir": Path(args.database) / "search"} if args.schedule == "search" and args.database else None
    bundle = compile_bundle(
        tenants,
        schedule=args.schedule,
        num_streams=args.streams,
        database=args.database,
        cores=args.threads,
        search_options=search,
    )
    if bundle.search_report is not None:
        print(bundle.search_report.summary())
    print(bundle.schedule.summary())
    print(f"exported to {bundle.export(args.output)}")
    return 0


def _run(args: argparse.Namespace) -> int:

    from cosched.runtime import load

    bundle = load(args.bundle)
    inputs = bundle.random_inputs()
    bundle.run(inputs)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = bundle.run(inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    print(bundle.schedule.summary())
    for tenant, outs in out.items():
        print(f"{tenant}: outputs {[o.shape for o in outs]}")
    print(f"median {sorted(times)[len(times) // 2]:.2f} ms over {args.repeat} runs")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .compare import load_models
    from .tenant import load_onnx
    from .tuning import tune

    models = load_models(args.models)
    tenants = [load_onnx(m, name=n) for n, m in models.items()]
    report = tune(
        tenants,
        work_dir=args.work_dir,
        trials=args.trials,
        time_budget=None if args.budget is None else args.budget * 60,
        patience=args.patience or None,
        transfer=args.transfer,
        prune=args.prune,
        cache_flush=args.cache_flush,
        max_tasks=args.max_tasks,
        start_from=args.start_from,
        kernels=args.kernels,
    )
    print(
        f"{report.tasks_deduped} distinct kernels ({report.dedup_saved} tasks shared by tenants, tuned once); "
        f"{report.trials_run} trials on {report.tasks_tuned} of them in {report.seconds / 60:.1f} min; "
        f"{report.tasks_stopped_early} task passes stopped early "
        f"({report.trials_saved} trials saved); {report.trials_transferred} trials on schedules transferred "
        f"from same-family workloads, {report.trials_injective} on cosched's element-wise schedules; "
        f"{report.tasks_left} not reached; "
        f"database in {args.work_dir}"
    )
    if 0 < len(report.tuned) <= TUNED_SHOWN:  # a deep pass on a few: what it bought each of them
        for name in report.tuned:
            was = report.best_before_us.get(name)
            now = report.best_us.get(name)
            if now is not None:
                print(f"  {name}: {'untuned' if was is None else f'{was:.1f} us'} -> {now:.1f} us")
    if report.records_remeasured:
        print(
            f"first timed its {report.records_remeasured} records again: they had been measured on another CPU "
            "(--start-from), thread count or with the caches the other way"
        )
    if args.schedule:
        from .compiler import compile as compile_bundle

        search_dir = Path(args.work_dir) / "search"
        bundle = compile_bundle(
            tenants, database=args.work_dir, schedule="search", search_options={"work_dir": search_dir, "log": print}
        )
        print(bundle.search_report.summary())
        print(f"searched schedule and cost model in {search_dir}")
    return 0


def demo(out: Path, threads: int | None = None, repeat: int = 10) -> int:
    """The main job: three real models as one bundle, checked, benchmarked, and drawn."""
    import numpy as np
    import onnxruntime as ort

    from .compare import compare, load_models, make_inputs, shipped_database, tune_command
    from .reference import AloneRunner
    from .target import host_cpu, host_target
    from .tenant import load_onnx
    from .tuning_db import check_database

    out.mkdir(parents=True, exist_ok=True)
    models = load_models(DEMO_MIX)
    database = shipped_database("demo")
    if database is not None:
        try:
            check_database(database, host_target())
        except CoschedError as err:
            print(f"shipped database not usable here ({err}); running untuned")
            database = None
    if database is None:
        print(
            f"no tuned database for this CPU ({host_cpu()}): kernels are UNTUNED and single-threaded, so the "
            f"numbers below say little about co-scheduling (tune them: {tune_command('demo')})"
        )
    else:
        print(f"using the shipped MetaSchedule database {database}")

    result = compare(models, threads=threads, database=database, repeat=repeat)
    tenants = [load_onnx(m, name=n) for n, m in models.items()]
    inputs = make_inputs(tenants)
    bundle = result.bundles["breadth_first"]
    outputs = bundle.run(inputs)
    print("\ncorrectness (cosched breadth_first vs each model alone on the Relax VM, and vs ONNX Runtime):")
    for tenant in tenants:
        alone = AloneRunner(tenant, host_target(), database).run(inputs[tenant.name])
        session = ort.InferenceSession(models[tenant.name].SerializeToString(), providers=["CPUExecutionProvider"])
        onnxrt = session.run(None, inputs[tenant.name])
        for got, vm, ref in zip(outputs[tenant.name], alone, onnxrt, strict=True):
            np.testing.assert_allclose(got, vm, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-6)
            err = float(np.max(np.abs(got.reshape(ref.shape) - ref)))
            print(f"  {tenant.name:<14} equal to the VM (rtol 1e-5); max |diff| to ORT {err:.2e} (rtol 1e-4): OK")

    print("\n" + result.report())
    trace = bundle.profile(inputs)
    png = trace.plot(
        out / "gantt.png",
        title=f"cosched breadth_first on {bundle.schedule.num_streams} streams: {', '.join(DEMO_MIX)}",
    )
    chrome = trace.save_chrome(out / "trace.json")
    (out / "bench.txt").write_text(result.report() + "\n")
    print(f"\nwrote {png} (Gantt chart), {chrome} (open in ui.perfetto.dev) and {out / 'bench.txt'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo(Path(args.out), threads=args.threads, repeat=args.repeat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosched", description="Compile several DNN models into one co-scheduled TVM module, run and benchmark it."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    models_help = "light model names (squeezenet, shufflenet, inception_v1, resnet50, ...) or .onnx paths"

    p = sub.add_parser("bench", help="compare cosched with the Relax VM and ONNX Runtime on the same models")
    p.add_argument("models", nargs="+", help=models_help)
    p.add_argument("--threads", type=int, default=None, help="core budget (default: all cores)")
    p.add_argument("--database", default=None, help="MetaSchedule database directory for the kernels")
    p.add_argument("--strategies", nargs="+", default=["sequential", "round_robin", "breadth_first"])
    p.add_argument("--streams", type=int, default=None, help="number of streams (default: one per tenant)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.set_defaults(func=_bench)

    p = sub.add_parser("compile", help="compile models into one bundle and export it")
    p.add_argument("models", nargs="+", help=models_help)
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument("--schedule", default="breadth_first")
    p.add_argument("--streams", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--database", default=None)
    p.set_defaults(func=_compile)

    p = sub.add_parser("run", help="load an exported bundle with the runtime alone and time it on random inputs")
    p.add_argument("bundle")
    p.add_argument("--repeat", type=int, default=10)
    p.set_defaults(func=_run)

    p = sub.add_parser("tune", help="tune the kernels of a bundle with MetaSchedule into a database")
    p.add_argument("models", nargs="+", help=models_help)
    p.add_argument("--work-dir", required=True)
    p.add_argument(
        "--trials",
        type=int,
        default=8,
        help="trials per task: 2 for every task first, then 4x as many, up to this, costliest first",
    )
    p.add_argument("--budget", type=float, default=None, help="time budget in minutes")
    p.add_argument(
        "--patience",
        type=int,
        default=16,
        help="stop a task after this many trials without a 2%% gain, or half the trials its workload "
        "already had if more (0: never)",
    )
    p.add_argument(
        "--transfer",
        action="store_true",
        help="seed new workloads with refitted schedules of tuned same-family ones (experimental: slower so far)",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="drop records of kernels these models no longer have (e.g. tuned before a TVM or cosched upgrade)",
    )
    p.add_argument(
        "--cache-flush",
        action="store_true",
        help="time candidates cold, each run right after every argument but the input was flushed from the "
        "caches (experimental: it picked no faster kernels for the shipped mixes)",
    )
    p.add_argument(
        "--max-tasks", type=int, default=None, help="in each pass, tune only this many workloads, costliest first"
    )
    p.add_argument(
        "--kernels",
        nargs="+",
        default=None,
        metavar="NAME",
        help="tune only these workloads (regular expressions over kernel names such as "
        "fused_conv2d3_add2_add3_relu21, as benchmarks/kernel_breakdown.py lists them)",
    )
    p.add_argument(
        "--start-from",
        default=None,
        metavar="DIR",
        help="an empty --work-dir starts from this database tuned for another CPU (its records timed here "
        "again, then tuned on), e.g. databases/znver4/demo",
    )
    p.add_argument("--schedule", action="store_true", help="then search the co-schedule (learned cost model)")
    p.set_defaults(func=_tune)

    p = sub.add_parser("demo", help="the main job: three real models, checked, benchmarked and drawn")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=10)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CoschedError as err:
        print(f"cosched: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
