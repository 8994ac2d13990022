"""cosched's schedules for injective kernels: their shape, their numerics, and how tuning measures them."""

import json

import numpy as np
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import te

from cosched import tuning, tuning_db
from cosched.injective_schedule import injective_candidates
from cosched.models import graph_model
from cosched.passes import LowerKernels
from cosched.target import host_target
from cosched.tenant import load_onnx
from tests.test_tuning import assert_tuned_computes_as_untuned

TARGET = host_target()


def batch_norm_relu(channels: int) -> tvm.IRModule:
    """relu(x * scale + shift) on NHWC, the scale and shift per channel (DenseNet's pre-activation)."""
    x = te.placeholder((1, 7, 7, channels), name="x")
    scale = te.placeholder((channels,), name="scale")
    shift = te.placeholder((channels,), name="shift")
    y = te.compute(x.shape, lambda n, h, w, c: x[n, h, w, c] * scale[c] + shift[c], name="affine")
    out = te.compute(x.shape, lambda *i: tvm.te.max(y(*i), tvm.tirx.const(0.0, "float32")), name="compute")
    return tvm.IRModule({"main": te.create_prim_func([x, scale, shift, out])})


def run(mod: tvm.IRModule, args: list[np.ndarray]) -> np.ndarray:
    tensors = [tvm.runtime.tensor(a) for a in args]
    tvm.compile(mod, TARGET).mod["main"](*tensors)
    return tensors[-1].numpy()


@pytest.mark.parametrize(("channels", "widths"), [(48, [16]), (224, [16, 32]), (256, [16, 32, 64]), (12, [])])
def test_channels_stay_the_vector_loop(channels, widths):
    candidates = injective_candidates(batch_norm_relu(channels))
    assert len(candidates) == len(widths)
    for sch, width in zip(candidates, widths, strict=True):
        script = sch.mod.script()
        assert "T.parallel(49)" in script and f"T.vectorized({width})" in script
        assert "affine" not in script  # inlined into the ReLU


def test_candidates_compute_what_the_kernel_does():
    mod = batch_norm_relu(224)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in [(1, 7, 7, 224), (224,), (224,), (1, 7, 7, 224)]]
    expected = np.maximum(args[0] * args[1] + args[2], 0)
    for sch in injective_candidates(mod):
        np.testing.assert_allclose(run(sch.mod, args), expected, rtol=1e-5, atol=1e-6)  # FMA rounds once


def test_reductions_get_none():
    x = te.placeholder((16, 64), name="x")
    k = te.reduce_axis((0, 64), name="k")
    total = te.compute((16,), lambda i: te.sum(x[i, k], axis=k), name="total")
    assert injective_candidates(tvm.IRModule({"main": te.create_prim_func([x, total])})) == []


def concat_affine_model():
    """Between two convolutions, concat then a per-channel multiply-add and ReLU: one NHWC kernel on 48 channels."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal(shape).astype("float32"), name)
        for name, shape in [
            ("w0", (24, 4, 1, 1)),
            ("w1", (24, 24, 1, 1)),
            ("s", (1, 48, 1, 1)),
            ("b", (1, 48, 1, 1)),
            ("w2", (8, 48, 1, 1)),
        ]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"]),
        helper.make_node("Conv", ["a", "w1"], ["c"]),
        helper.make_node("Concat", ["a", "c"], ["cat"], axis=1),
        helper.make_node("Mul", ["cat", "s"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["r"]),
        helper.make_node("Relu", ["r"], ["act"]),
        helper.make_node("Conv", ["act", "w2"], ["y"]),
    ]
    return graph_model("cat", nodes, inits, ("x", [1, 4, 8, 8]), ("y", [1, 8, 8, 8]))


def test_tuning_measures_them_once_also_in_a_database_tuned_before(tmp_path):
    tenant = load_onnx(concat_affine_model(), name="t")
    mod = LowerKernels(TARGET)(tenant.mod)
    first = tuning.tune([tenant], TARGET, tmp_path, trials=2, progress=False)
    assert first.trials_injective >= 1
    meta_path = tmp_path / tuning_db.META_FILE
    meta = json.loads(meta_path.read_text())
    assert meta["injective"]
    # Complete, candidates measured: nothing to do.
    again = tuning.tune_modules([mod], TARGET, tmp_path, trials_per_task=2, names=["t"], progress=False)
    assert again.trials_run == 0
    # A database tuned before the candidates existed gets just them measured.
    meta["injective"] = []
    meta_path.write_text(json.dumps(meta))
    older = tuning.tune_modules([mod], TARGET, tmp_path, trials_per_task=2, names=["t"], progress=False)
    assert older.trials_run == older.trials_injective == first.trials_injective
    # Whichever schedule won, the tuned module computes what the untuned one does.
    assert_tuned_computes_as_untuned(tenant, tmp_path, (1, 4, 8, 8))


def test_a_symbolic_innermost_extent_gets_none():
    n = tvm.tirx.Var("n", "int64")
    x = te.placeholder((64, n), name="x")
    y = te.compute((64, n), lambda i, j: x[i, j] * 2.0, name="y")
    assert injective_candidates(tvm.IRModule({"main": te.create_prim_func([x, y])})) == []
