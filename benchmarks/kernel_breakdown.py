"""Where each model's time goes, by operator kind: tuned TVM kernels next to ONNX Runtime's operators.

    python benchmarks/kernel_breakdown.py --mix demo > benchmarks/results/breakdown-demo.txt
    python benchmarks/kernel_breakdown.py --mix dense_incv2_alex --models inception_v2 --convs 12

``--convs N`` adds the N costliest convolution shapes, TVM's time next to ORT's for the same shapes.

Each model alone, the mix's shipped database, all cores. TVM: the kernels' times from
``Bundle.profile`` summed by the fused kernel's name without numbers (``fused_conv2d_add_relu``).
ONNX Runtime: its profiler's per-node times summed by operator type. Each kernel or node counts its
median over the profiled runs: on this shared machine one run in ten can take twice as long, and
with means it once made a ResNet-50 convolution shape look 3.9x ORT's time instead of 1.1x. Both
profiles cost time, so the totals are above the plain latencies (printed too, measured
alternately); the shares are what matter.
"""

import argparse
import collections
import json
import math
import os
import re
import statistics
import sys
import tempfile

os.environ.setdefault("TVM_BIND_THREADS", "0")

import onnxruntime as ort

import cosched
from cosched import bench
from cosched.compare import MIXES, load_models, make_inputs, shipped_database
from cosched.target import host_target


def kernel_samples(bundle, inputs, repeat: int) -> tuple[dict[int, list[float]], dict[int, str], list[float]]:
    """``repeat`` profiled runs: each kernel's microseconds per run, its function name, and each
    run's span (first start to last end) in microseconds."""
    times: dict[int, list[float]] = collections.defaultdict(list)
    funcs: dict[int, str] = {}
    spans = []
    for _ in range(repeat):
        trace = bundle.profile(inputs)
        spans.append(trace.span_us)
        for event in trace.events:
            times[event.kernel].append(event.end_us - event.start_us)
            funcs[event.kernel] = event.func
    return dict(times), funcs, spans


def tvm_kinds(bundle, inputs, repeat: int) -> tuple[dict[str, float], dict[tuple, list], float, int]:
    """Milliseconds per inference by kernel kind and by convolution shape (``conv_shapes``: count,
    milliseconds, workloads), the span from first start to last end, the kernel count: each kernel's
    median over the runs."""
    shapes = conv_shapes(bundle.schedule)
    times, funcs, spans = kernel_samples(bundle, inputs, repeat)
    kinds: dict[str, float] = collections.defaultdict(float)
    convs: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0, set()])
    for kernel, samples in times.items():
        ms = statistics.median(samples) / 1e3
        kinds[kernel_kind(funcs[kernel])] += ms
        if kernel in shapes:
            convs[shapes[kernel]][0] += 1
            convs[shapes[kernel]][1] += ms
            convs[shapes[kernel]][2].add(kernel_workload(funcs[kernel]))
    return dict(kinds), dict(convs), statistics.median(spans) / 1e3, len(times)


def conv_shapes(schedule) -> dict[int, tuple[int, int]]:
    """Each convolution kernel's (input, output) element counts: layouts differ between TVM and ORT,
    sizes do not. A kernel reading or writing a slice of a concatenation counts the slice."""

    def elements(k, i: int) -> int:
        buf = schedule.buffers[k.args[i]]
        return k.slice_bytes.get(i, buf.nbytes) * math.prod(buf.shape) // buf.nbytes

    return {k.id: (elements(k, 0), elements(k, len(k.args) - 1)) for k in schedule.kernels if "conv2d" in k.func}


def kernel_workload(func: str) -> str:
    """The workload a kernel runs: its name without ``_prepacked`` or ConcatInPlace's suffix
    (``..._from_<var>_<offset>``, ``..._into_<var>_<offset>``)."""
    return re.split(r"_(?:from|into)_", func)[0].removesuffix("_prepacked")


def kernel_kind(func: str) -> str:
    """A kernel's workload without numbers; ConcatInPlace's rewrites keep their kernel's kind and say
    which way they use a concatenation."""
    kind = re.sub(r"\d+", "", kernel_workload(func))
    uses = [word for word in ("from", "into") if f"_{word}_" in func]
    return f"{kind} ({' and '.join(uses)} a concatenation)" if uses else kind


def ort_kinds(
    session_bytes: bytes, feed, threads: int, repeat: int
) -> tuple[dict[str, float], dict[tuple, list[float]]]:
    """Milliseconds per inference by ONNX operator type (ORT's own profiler), and of its convolutions
    by (input, output) element counts."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(session_bytes, options, providers=["CPUExecutionProvider"])
        for _ in range(1 + repeat):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    # The first run is the warm-up: its nodes end before the first model_run event does.
    first = min((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    warm = first["ts"] + first["dur"]
    durations: dict[str, list[float]] = collections.defaultdict(list)
    nodes: dict[str, dict] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= warm:
            durations[e["name"]].append(e["dur"] / 1e3)
            nodes[e["name"]] = e["args"]
    kinds: dict[str, float] = collections.defaultdict(float)
    convs: dict[tuple, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for name, samples in durations.items():
        args, ms = nodes[name], statistics.median(samples)
        kinds[args["op_name"]] += ms
        if "Conv" in args["op_name"]:
            sizes = [
                math.prod(next(iter(t.values()))) for t in (args["input_type_shape"][0], args["output_type_shape"][0])
            ]
            convs[tuple(sizes)][0] += 1
            convs[tuple(sizes)][1] += ms
    return dict(kinds), dict(convs)


def conv_table(tvm: dict[tuple, list], ort_: dict[tuple, list[float]], top: int) -> list[str]:
    """The ``top`` convolution shapes by TVM time: count and ms per inference in each, TVM/ORT, and
    TVM's workloads of that shape (what ``cosched tune --kernels`` takes)."""
    head = f"{'input, output elements':<26} {'TVM n':>5} {'TVM ms':>8} {'ORT n':>5} {'ORT ms':>8} {'TVM/ORT':>7}"
    lines = [f"    {head}  workloads"]
    for shape, (n, ms, workloads) in sorted(tvm.items(), key=lambda kv: -kv[1][1])[:top]:
        on, oms = ort_.get(shape, (0, 0.0))
        ratio = f"{ms / oms:7.2f}" if oms else "      -"
        row = f"{f'{shape[0]}, {shape[1]}':<26} {n:5d} {ms:8.3f} {round(on):5d} {oms:8.3f} {ratio}"
        lines.append(f"    {row}  {' '.join(sorted(workloads))}")
    return lines


def table(kinds: dict[str, float], top: int) -> list[str]:
    total = sum(kinds.values())
    rows = sorted(kinds.items(), key=lambda kv: -kv[1])
    lines = [f"    {name[:48]:<48} {ms:8.3f} {100 * ms / total:5.1f}%" for name, ms in rows[:top]]
    rest = sum(ms for _, ms in rows[top:])
    if rest:
        lines.append(f"    {f'({len(rows) - top} more kinds)':<48} {rest:8.3f} {100 * rest / total:5.1f}%")
    return [f"    {'total':<48} {total:8.3f}", *lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--models", nargs="+", help="only these models of the mix")
    parser.add_argument("--convs", type=int, default=0, help="also the N costliest convolution shapes")
    args = parser.parse_args()
    database = shipped_database(args.mix)
    threads = os.cpu_count() or 1
    models = load_models(MIXES[args.mix])
    print(bench.header(threads, host_target()))
    print(f"database: {database or 'none (untuned kernels)'}; each model alone; {args.repeat} profiled runs")
    for name, model in models.items():
        if args.models and name not in args.models:
            continue
        tenant = cosched.load_onnx(model, name=name)
        inputs = make_inputs([tenant])
        bundle = cosched.compile([tenant], database=database, cores=threads)
        session = bench.ort_sequential({name: model}, inputs, threads, measure_memory=False)
        with bench.closing([session]):
            plain = bench.measure(
                [bench.Contender("tvm", lambda b=bundle, x=inputs: b.run(x)), session], repeat=args.repeat
            )
        tvm_ms, ort_ms = (r.median_ms for r in plain)
        print(f"\n== {name}: latency TVM {tvm_ms:.2f} ms, ORT {ort_ms:.2f} ms (TVM/ORT {tvm_ms / ort_ms:.2f})")
        kinds, tvm_convs, span, count = tvm_kinds(bundle, inputs, args.repeat)
        # One stream: the span less the kernels' sum is the executor's time between kernels.
        gap_us = 1e3 * (span - sum(kinds.values())) / count
        print(f"  TVM kernels (profiled; {count} kernels, span {span:.3f} ms, {gap_us:.2f} us between kernels)")
        print("\n".join(table(kinds, args.top)))
        print("  ONNX Runtime operators (profiled)                   ms/inf share")
        ort_by_kind, ort_convs = ort_kinds(model.SerializeToString(), inputs[name], threads, args.repeat)
        print("\n".join(table(ort_by_kind, args.top)))
        if args.convs:
            print("  convolutions by shape (ms per inference)")
            print("\n".join(conv_table(tvm_convs, ort_convs, args.convs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
