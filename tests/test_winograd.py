"""Winograd convolutions: exact against direct ones, only where they apply, fused, and chosen by the database."""

import os

os.environ.setdefault("TVM_BIND_THREADS", "0")

import json
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from cosched import tuning, tuning_db
from cosched.models import tiny_cnn
from cosched.passes import LowerKernels
from cosched.passes.winograd import (
    COMPUTE_VERSION,
    DEFAULT_RULE,
    WINOGRAD_KERNEL,
    Tier,
    WinogradConv2d,
    WinogradRule,
)
from cosched.target import host_target
from cosched.tenant import load_onnx

TARGET = host_target()


def conv_module(
    size: tuple[int, int], cin: int, cout: int, padding=(1, 1, 1, 1), strides=(1, 1), groups: int = 1, kernel: int = 3
) -> tvm.IRModule:
    """main(x) = conv2d(x, w) in NHWC with constant OHWI weights ``w``, as ChannelsLast leaves it."""
    w = np.random.default_rng(0).standard_normal((cout, kernel, kernel, cin // groups)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, *size, cin), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(
                relax.op.nn.conv2d(
                    x,
                    relax.const(w),
                    strides=strides,
                    padding=padding,
                    groups=groups,
                    data_layout="NHWC",
                    kernel_layout="OHWI",
                )
            )
        bb.emit_func_output(out)
    return bb.get()


def kernels(mod: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]


def run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize(
    "size, padding",
    [((8, 8), (1, 1, 1, 1)), ((7, 5), (1, 1, 1, 1)), ((7, 7), (0, 0, 0, 0)), ((5, 6), (2, 0, 1, 1))],
    ids=["whole-tiles", "odd-sizes", "no-padding", "uneven-padding"],
)
def test_winograd_computes_the_direct_convolution(size, padding, tile):
    mod = conv_module(size, 5, 7, padding)
    winograd = relax.get_pipeline("zero")(WinogradConv2d(WinogradRule((Tier(tile, 1, 1),)))(mod))
    direct = relax.get_pipeline("zero")(mod)
    assert any(WINOGRAD_KERNEL in k for k in kernels(winograd)), kernels(winograd)
    assert not any(WINOGRAD_KERNEL in k for k in kernels(direct))
    x = np.random.default_rng(1).standard_normal((1, *size, 5)).astype("float32")
    np.testing.assert_allclose(run(winograd, x), run(direct, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, applies",
    [
        ({}, True),
        ({"strides": (2, 2)}, False),
        ({"groups": 2}, False),
        ({"kernel": 1, "padding": (0, 0, 0, 0)}, False),
        ({"cin": 128}, False),
        ({"cout": 128}, False),
        ({"size": (14, 12)}, False),
        ({"size": (28, 28), "cin": 64, "cout": 96}, True),
        ({"size": (28, 28), "cin": 32, "cout": 96}, False),
    ],
    ids=[
        "wide-3x3",
        "stride-2",
        "grouped",
        "1x1",
        "narrow-input",
        "narrow-output",
        "small-image",
        "f4-tier",
        "f4-narrow",
    ],
)
def test_only_wide_3x3_stride_1_convolutions_with_constant_weights(kwargs, applies):
    shape = {"size": (14, 14), "cin": 256, "cout": 256, **kwargs}
    mod = conv_module(shape.pop("size"), shape.pop("cin"), shape.pop("cout"), **shape)
    call = mod["main"].body.blocks[0].bindings[0].value
    assert (DEFAULT_RULE.tile(call) is not None) is applies
    lowered = LowerKernels(TARGET, channels_last=False)(mod)
    assert any(WINOGRAD_KERNEL in k for k in kernels(lowered)) is applies


def test_transforms_get_metaschedules_winograd_rules():
    """The data and output transforms carry the schedule rules MetaSchedule has for them on this target:
    its generic rules leave their tile loops rolled, and the kernel 1.9x slower (28x28, 128 channels)."""
    lowered = LowerKernels(TARGET, channels_last=False)(conv_module((28, 28), 64, 64))
    (func,) = [f for gv, f in lowered.functions.items() if WINOGRAD_KERNEL in gv.name_hint]
    sch = tvm.s_tir.Schedule(func)
    rules = {name: str(sch.get(sch.get_sblock(name)).annotations["schedule_rule"]) for name in ("data_pack", "inverse")}
    assert rules["data_pack"] == "conv2d_nhwc_winograd_data_pack"
    assert rules["inverse"] == "conv2d_nhwc_winograd_inverse"
    for rule in (rules["data_pack"], rules["inverse"]):
        assert any(tvm.get_global_func(f"s_tir.meta_schedule.{key}.{rule}", True) for key in TARGET.keys), rule


def test_weights_that_are_parameters_stay_direct():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 14, 14, 256), "float32"))
    w = relax.Var("w", relax.TensorType((256, 3, 3, 256), "float32"))
    with bb.function("main", [x, w]):
        out = bb.emit(relax.op.nn.conv2d(x, w, padding=(1, 1), data_layout="NHWC", kernel_layout="OHWI"))
        bb.emit_func_output(out)
    assert DEFAULT_RULE.tile(bb.get()["main"].body.blocks[0].bindings[0].value) is None


def wide_cnn():
    """tiny_cnn whose second conv (14x14, 256 -> 256 channels, + bias, ReLU, residual add) is Winograd's."""
    return load_onnx(tiny_cnn("wide", width=256, size=14), name="wide")


def test_bias_relu_and_residual_fuse_into_the_winograd_kernel():
    lowered = LowerKernels(TARGET)(wide_cnn().mod)
    winograd = [k for k in kernels(lowered) if WINOGRAD_KERNEL in k]
    assert len(winograd) == 1 and "relu" in winograd[0] and winograd[0].count("add") == 2, kernels(lowered)
    # Nothing of the epilogue is left to a kernel of its own.
    assert not [k for k in kernels(lowered) if k.startswith(("add", "relu", "fused_add", "fused_relu"))]


def test_the_database_decides_winograd_and_its_kernels_are_exact(tmp_path):
    """Tuning marks a database whose Winograd kernels all have records; compiling under it uses them.
    A database without the mark (tuned before, or without, them) keeps the direct convolutions."""
    tenant = wide_cnn()
    x = np.random.default_rng(2).standard_normal((1, 3, 14, 14)).astype("float32")
    db = tmp_path / "db"
    others = tuning.tune([tenant], TARGET, db, trials=1, progress=False, kernels=["fused_conv2d_add.*"])
    assert others.tuned and not any(WINOGRAD_KERNEL in name for name in others.tuned)
    assert tuning_db.WINOGRAD_META not in tuning_db.read_meta(db)
    assert not any(WINOGRAD_KERNEL in k for k in kernels(LowerKernels(TARGET, db)(tenant.mod)))

    report = tuning.tune([tenant], TARGET, db, trials=1, progress=False, kernels=[f".*{WINOGRAD_KERNEL}.*"])
    assert [name for name in report.tuned if WINOGRAD_KERNEL in name] == report.tuned != []
    assert tuning_db.read_meta(db)[tuning_db.WINOGRAD_META] == DEFAULT_RULE.to_json()
    tuned = LowerKernels(TARGET, db)(tenant.mod)
    assert any(WINOGRAD_KERNEL in k for k in kernels(tuned))
    direct = LowerKernels(TARGET, winograd=False)(tenant.mod)
    np.testing.assert_allclose(run(tuned, x), run(direct, x), rtol=1e-4, atol=1e-4)

    # The rule a database records is the one it compiles with, whatever today's default.
    # A rule recorded for another version of the Winograd compute names kernels this one does not make.
    for name, rule in (
        ("unmarked", None),
        ("other-rule", WinogradRule((Tier(2, 14, 512),)).to_json()),
        ("older-compute", {**DEFAULT_RULE.to_json(), "compute": COMPUTE_VERSION - 1}),
        ("first-format", [[2, 14, 256]]),
    ):
        other = tmp_path / name
        shutil.copytree(db, other)
        meta = json.loads((other / tuning_db.META_FILE).read_text())
        meta[tuning_db.WINOGRAD_META] = rule
        (other / tuning_db.META_FILE).write_text(json.dumps(meta))
        assert not any(WINOGRAD_KERNEL in k for k in kernels(LowerKernels(TARGET, other)(tenant.mod)))


def test_rule_round_trips_through_json():
    rule = WinogradRule((Tier(4, 28, 128), Tier(2, 14, 256)))
    assert WinogradRule.from_json(json.loads(json.dumps(rule.to_json()))) == rule
    assert WinogradRule.from_json(None) is None and WinogradRule.from_json(True) is None
    assert WinogradRule.from_json([[2, 14, 256]]) is None  # the first version's format: its kernels are gone
    assert WinogradRule.from_json({**rule.to_json(), "compute": COMPUTE_VERSION + 1}) is None
