"""The executor of another git revision against the current one, on the same kernels, with the Relax VM.

    python benchmarks/executor_ab.py --rev 09b62fd --mix demo --model shufflenet \
        > benchmarks/results/executor-ab-shufflenet.txt

One model alone (one stream, the mix's shipped database, all cores), so the executors differ only in
how they dispatch. Per executor: the kernels' summed time and the span from the first start to the
last end in profiled runs (their difference over the kernel count is the dispatch gap per kernel),
then plain latencies, alternated, with and without an idle pause before each run.
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TVM_BIND_THREADS", "0")

import numpy as np
from tvm_ffi.cpp import build

import cosched
from cosched import bench
from cosched.compare import MIXES, load_models, make_inputs, shipped_database
from cosched.runtime.bundle import Bundle
from cosched.runtime.native import build_executor
from cosched.target import host_target


def executor_at(rev: str, tmp: Path) -> Path:
    """The CPU executor built from ``rev``'s sources."""
    for name in ("executor.cc", "plan.h"):
        text = subprocess.run(
            ["git", "show", f"{rev}:runtime/src/{name}"], check=True, capture_output=True, text=True
        ).stdout
        (tmp / name).write_text(text)
    cflags = ["-O2", "-std=c++17"]
    lib = build(
        "cosched_executor_ab",
        sources=[str(tmp / "executor.cc")],
        extra_cflags=cflags,
        extra_include_paths=[str(tmp)],
        build_directory=str(tmp / "build"),
    )
    return Path(lib)


def gaps(bundle: Bundle, inputs, runs: int) -> str:
    sums, spans = [], []
    for _ in range(runs):
        trace = bundle.profile(inputs)
        events = trace.events
        sums.append(sum(e.end_us - e.start_us for e in events) / 1e3)
        spans.append(trace.span_us / 1e3)
    ks, sp = float(np.median(sums)), float(np.median(spans))
    return f"kernels {len(events)}, kernel sum {ks:.3f} ms, span {sp:.3f} ms, gap {1e3 * (sp - ks) / len(events):.2f} us/kernel"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="git revision of the other executor")
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--model", default="shufflenet")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    database = shipped_database(args.mix)
    models = load_models([args.model])
    tenants = [cosched.load_onnx(m, name=n) for n, m in models.items()]
    inputs = make_inputs(tenants)
    print(bench.header(threads, host_target()))
    print(f"model: {args.model}; database: {database}; executors: {args.rev} vs working tree")
    with tempfile.TemporaryDirectory() as tmp:
        libs = {args.rev: executor_at(args.rev, Path(tmp)), "current": build_executor("cpu")}
        contenders = [
            bench.relax_vm_sequential(tenants, inputs, host_target(), threads, database, measure_memory=False)
        ]
        compiled = cosched.compile(tenants, database=database, cores=threads)
        for tag, lib in libs.items():
            bundle = Bundle(dataclasses.replace(compiled.artifact, executor_lib=lib))
            print(f"{tag:>8}: {gaps(bundle, inputs, 20)}")
            contenders.append(bench.Contender(f"cosched@{tag}", lambda b=bundle: b.run(inputs)))
        for settle in (0.25, 0.0):
            results = bench.measure(contenders, repeat=args.repeat, settle_s=settle)
            print(f"\nidle {settle} s before each run; {args.repeat} runs each, alternated")
            for r in results:
                speed = results[0].median_ms / r.median_ms
                print(f"  {r.name:18} {r.median_ms:8.3f} ms  p25-p75 {r.p25:.3f}-{r.p75:.3f}  VM/this {speed:.3f}")
        for c in contenders:
            if c.close is not None:
                c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
