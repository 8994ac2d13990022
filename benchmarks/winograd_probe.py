"""One 3x3 convolution (NHWC, stride 1, bias + ReLU) tuned by MetaSchedule as Winograd and as direct.

    python benchmarks/winograd_probe.py --size 14 --channels 256 256 --tile 2 --trials 256

The probe that led to ``cosched.passes.WinogradConv2d`` (which ``LowerKernels`` now applies to wide
3x3 convolutions) and the way to try it on another shape or tile. The Winograd variant takes its
weights already transformed (``G g G^T``, folded at compile time, as prepacked weights are), so only
the data transform, the batched GEMM and the inverse transform run. Both variants are tuned from empty databases with the same trials and
timed by the same runner on the target's cores (MetaSchedule's best record); their outputs are
compared on random inputs.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TVM_BIND_THREADS", "0")

import numpy as np
import tvm
from tvm import te, topi
from tvm.s_tir import meta_schedule as ms

from cosched import bench
from cosched.passes.winograd import transform_weights, winograd_nhwc
from cosched.target import host_target
from cosched.tuning_measure import PooledBuilder, cpu_intrinsics_only, local_runner, num_cores


def winograd(size: int, cin: int, cout: int, tile: int) -> tvm.tirx.PrimFunc:
    """F(tile x tile, 3x3) over pre-transformed weights ``(alpha, alpha, cout, cin)``, as ``WinogradConv2d``
    legalizes it (at any tile), + bias + ReLU."""
    data = te.placeholder((1, size, size, cin), name="data")
    packed = te.placeholder((tile + 2, tile + 2, cout, cin), name="kernel_pack")
    bias = te.placeholder((1, 1, 1, cout), name="bias")
    conv = winograd_nhwc(data, packed, (1, 1, 1, 1), tile)
    out = te.compute(conv.shape, lambda *i: te.max(conv(*i) + bias[0, 0, 0, i[3]], 0.0), name="out")
    return te.create_prim_func([data, packed, bias, out]).with_attr("layout_free_buffers", [1])


def direct(size: int, cin: int, cout: int) -> tvm.tirx.PrimFunc:
    """The convolution as ``LowerKernels`` legalizes it: NHWC data, OHWI weights, bias, ReLU."""
    data = te.placeholder((1, size, size, cin), name="data")
    weight = te.placeholder((cout, 3, 3, cin), name="weight")
    bias = te.placeholder((1, 1, 1, cout), name="bias")
    conv = topi.nn.conv2d(data, weight, 1, 1, 1, data_layout="NHWC", kernel_layout="OHWI")
    out = te.compute(conv.shape, lambda *i: te.max(conv(*i) + bias[0, 0, 0, i[3]], 0.0), name="out")
    return te.create_prim_func([data, weight, bias, out]).with_attr("layout_free_buffers", [1])


def tune(func: tvm.tirx.PrimFunc, target, trials: int) -> tuple[tvm.runtime.Module, float, float]:
    """Tune from an empty database; the built best kernel (weight layout rewrite inside, for the
    numerics), its latency as the runner timed it (without the rewrite, in microseconds), minutes."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    start = time.time()
    cores = num_cores(target)
    with tempfile.TemporaryDirectory() as work, cpu_intrinsics_only(target):
        db = ms.tune_tir(
            mod,
            target,
            work,
            max_trials_global=trials,
            num_trials_per_iter=32,
            builder=PooledBuilder(max_workers=cores),
            runner=local_runner(cores, False),
        )
        best = db.get_top_k(db.commit_workload(mod), 1)[0]
        sch = tvm.s_tir.Schedule(mod)
        best.trace.apply_to_schedule(sch, remove_postproc=False)
    us = float(np.mean([float(s) for s in best.run_secs])) * 1e6
    return tvm.compile(sch.mod, target=target), us, (time.time() - start) / 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=14, help="height = width of the image")
    parser.add_argument("--channels", type=int, nargs=2, default=[256, 256], metavar=("IN", "OUT"))
    parser.add_argument("--tile", type=int, default=2, help="Winograd output tile (2: F(2x2,3x3), 4: F(4x4,3x3))")
    parser.add_argument("--trials", type=int, default=256)
    args = parser.parse_args()
    target = host_target()
    size, (cin, cout), tile = args.size, args.channels, args.tile
    print(bench.header(num_cores(target), target))
    print(f"conv 3x3 stride 1, {size}x{size}, {cin} -> {cout} channels, + bias + ReLU; {args.trials} trials each")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, size, size, cin), dtype="float32")
    w = (rng.standard_normal((cout, 3, 3, cin), dtype="float32") / np.sqrt(9 * cin)).astype("float32")
    bias = rng.standard_normal((1, 1, 1, cout), dtype="float32")
    dev = tvm.cpu()
    outs, times = {}, {}
    for name, func, weights in (
        (f"winograd F({tile}x{tile},3x3)", winograd(size, cin, cout, tile), transform_weights(w, tile)),
        ("direct", direct(size, cin, cout), w),
    ):
        lib, times[name], minutes = tune(func, target, args.trials)
        out = tvm.runtime.empty((1, size, size, cout), "float32", dev)
        lib["main"](*[tvm.runtime.tensor(a, dev) for a in (x, weights, bias)], out)
        outs[name] = out.numpy()
        print(f"{name:24s} best {times[name]:8.1f} us per call, tuned in {minutes:.1f} min")
    (wname, wout), (_, dout) = outs.items()
    err = float(np.max(np.abs(wout - dout)) / np.max(np.abs(dout)))
    print(f"direct / winograd: {times['direct'] / times[wname]:.2f}x; max |difference| / max |output|: {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
