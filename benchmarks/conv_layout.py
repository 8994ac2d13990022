"""NCHW vs NHWC: single ResNet-50 convolutions tuned with the same trials, next to ONNX Runtime.

    python benchmarks/conv_layout.py --trials 64 > benchmarks/results/conv-layout.txt

Each convolution (+ bias + ReLU, as after ``SimplifyInference``) is lowered by ``LowerKernels`` with
``channels_last`` off and on, tuned from an empty database with ``trials`` trials (no early stop),
and its best measured kernel time is printed next to ONNX Runtime's latency for the same
one-node model at the same threads. Each layout gets its own database, so neither learns from the
other; the transposes NHWC adds at a model's boundary are listed apart (inside a model there are two).
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TVM_BIND_THREADS", "0")

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from cosched import bench, tuning, tuning_db
from cosched.models import graph_model
from cosched.passes import LowerKernels
from cosched.target import host_target
from cosched.tenant import load_onnx

CASES = [  # (in channels, height = width, out channels, kernel size): one per ResNet-50 stage
    (64, 56, 64, 3),
    (256, 56, 64, 1),
    (1024, 14, 256, 1),
    (512, 7, 512, 3),
]


def conv_model(channels: int, size: int, out: int, kernel: int, rng: np.random.Generator) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array((rng.standard_normal((out, channels, kernel, kernel)) * 0.05).astype("float32"), "w"),
        numpy_helper.from_array(rng.standard_normal(out).astype("float32"), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[kernel // 2] * 4),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return graph_model("conv", nodes, inits, ("x", [1, channels, size, size]), ("y", [1, out, size, size]), opset=17)


def ort_ms(model: onnx.ModelProto, x: np.ndarray, threads: int, repeat: int = 30) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def tuned_ms(model: onnx.ModelProto, channels_last: bool, trials: int, target) -> tuple[float, float]:
    """(best convolution kernel ms, best transposes ms) after tuning from an empty database."""
    lowered = LowerKernels(target, channels_last=channels_last)(load_onnx(model, name="conv").mod)
    with tempfile.TemporaryDirectory() as work_dir:
        tuning.tune_modules([lowered], target, work_dir, trials_per_task=trials, progress=False, patience=None)
        database = tuning_db.open_database(work_dir)
        best = {t.name: tuning_db.best_us(database, t) / 1e3 for t in tuning.extract_tasks([lowered], target)}
    conv = sum(v for k, v in best.items() if "conv" in k)
    return conv, sum(v for k, v in best.items() if "conv" not in k)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    target = host_target(threads)
    rng = np.random.default_rng(0)
    print(bench.header(threads, target))
    print(f"trials  : {args.trials} per kernel, each layout from an empty database, no early stop\n")
    print(
        f"{'convolution (C, HxW, K, k)':<28}{'ORT ms':>8}{'NCHW ms':>9}{'NHWC ms':>9}{'NCHW/NHWC':>11}{'NHWC/ORT':>10}"
    )
    for channels, size, out, kernel in CASES:
        model = conv_model(channels, size, out, kernel, rng)
        x = rng.standard_normal((1, channels, size, size)).astype("float32")
        ort_t = ort_ms(model, x, threads)
        nchw, _ = tuned_ms(model, False, args.trials, target)
        nhwc, transposes = tuned_ms(model, True, args.trials, target)
        label = f"{channels}, {size}x{size}, {out}, {kernel}x{kernel}"
        print(
            f"{label:<28}{ort_t:8.2f}{nchw:9.2f}{nhwc:9.2f}{nchw / nhwc:11.2f}{nhwc / ort_t:10.2f}"
            f"   (+{transposes:.2f} ms of boundary transposes)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
