"""SimplifyInference and ChannelsLast: fewer kernels, NHWC convolutions, results unchanged."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

from cosched.models import graph_model
from cosched.passes import ChannelsLast, LowerKernels, SimplifyInference
from cosched.target import host_target
from cosched.tenant import load_onnx


def x_to_y_model(name: str, nodes, inits, channels: int) -> onnx.ModelProto:
    """A graph from x (1x4x12x12) to y (1 x channels x 12x12)."""
    return graph_model(name, nodes, inits, ("x", [1, 4, 12, 12]), ("y", [1, channels, 12, 12]))


def conv_bn_sum_model() -> onnx.ModelProto:
    """Two conv+BN branches summed, then a BN that follows no convolution, then ReLU."""
    rng = np.random.default_rng(0)

    def const(name, *shape, positive=False):
        value = rng.uniform(0.5, 1.5, shape) if positive else rng.standard_normal(shape)
        return numpy_helper.from_array(value.astype("float32"), name)

    inits = [const("w1", 8, 4, 3, 3), const("w2", 8, 4, 1, 1)]
    nodes = []
    for i, (conv, pads) in enumerate([("w1", [1, 1, 1, 1]), ("w2", [0, 0, 0, 0])]):
        inits += [const(f"g{i}", 8), const(f"b{i}", 8), const(f"m{i}", 8), const(f"v{i}", 8, positive=True)]
        nodes += [
            helper.make_node("Conv", ["x", conv], [f"c{i}"], pads=pads),
            helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"]),
        ]
    inits += [const("g2", 8), const("b2", 8), const("m2", 8), const("v2", 8, positive=True)]
    nodes += [
        helper.make_node("Sum", ["n0", "n1"], ["s"]),
        helper.make_node("BatchNormalization", ["s", "g2", "b2", "m2", "v2"], ["t"]),
        helper.make_node("Relu", ["t"], ["y"]),
    ]
    return x_to_y_model("conv_bn_sum", nodes, inits, 8)


def op_counts(mod: tvm.IRModule) -> collections.Counter:
    counts = collections.Counter()
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            if isinstance(binding.value, relax.Call) and isinstance(binding.value.op, tvm.ir.Op):
                counts[binding.value.op.name] += 1
    return counts


def test_batch_norms_and_sum_are_gone():
    before = load_onnx(conv_bn_sum_model(), name="m").mod
    assert op_counts(before)["relax.nn.batch_norm"] == 3 and op_counts(before)["relax.stack"] == 1
    after = op_counts(SimplifyInference()(before))
    assert after["relax.nn.batch_norm"] == after["relax.stack"] == after["relax.sum"] == 0
    assert after["relax.nn.conv2d"] == 2


def concat_bn_scale_model() -> onnx.ModelProto:
    """Concat -> BN -> Mul by a (C, 1, 1) constant -> ReLU -> Dropout, as in DenseNet and SqueezeNet."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.standard_normal(shape).astype("float32"), name)
        for name, shape in [("w", (8, 4, 3, 3)), ("g", (12,)), ("b", (12,)), ("m", (12,)), ("s", (12, 1, 1))]
    ]
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, 12).astype("float32"), "v"))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["c", "x"], ["k"], axis=1),
        helper.make_node("BatchNormalization", ["k", "g", "b", "m", "v"], ["n"]),
        helper.make_node("Mul", ["n", "s"], ["q"]),
        helper.make_node("Relu", ["q"], ["r"]),
        helper.make_node("Dropout", ["r"], ["y"]),
    ]
    return x_to_y_model("concat_bn_scale", nodes, inits, 12)


def caffe_scale_model() -> onnx.ModelProto:
    """Caffe's BN + Scale (Mul, Add) after a biased conv and after a concat, as in DenseNet-121 and Inception-v2.

    The second batch norm's output also feeds the final Add, so it must stay computed once.
    """
    rng = np.random.default_rng(4)

    def const(name, *shape, positive=False):
        value = rng.uniform(0.5, 1.5, shape) if positive else rng.standard_normal(shape)
        return numpy_helper.from_array(value.astype("float32"), name)

    inits = [const("w", 8, 4, 3, 3), const("bias", 8)]
    for i, c in enumerate((8, 12)):
        inits += [const(f"g{i}", c), const(f"b{i}", c), const(f"m{i}", c), const(f"v{i}", c, positive=True)]
        inits += [const(f"s{i}", c, 1, 1), const(f"t{i}", c, 1, 1)]
    nodes = [helper.make_node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1])]
    for i, src in enumerate(("c", "k")):
        nodes += [
            helper.make_node("BatchNormalization", [src, f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"]),
            helper.make_node("Mul", [f"n{i}", f"s{i}"], [f"q{i}"]),
            helper.make_node("Add", [f"q{i}", f"t{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        if i == 0:
            nodes.append(helper.make_node("Concat", ["r0", "x"], ["k"], axis=1))
    nodes.append(helper.make_node("Add", ["r1", "n1"], ["y"]))
    return x_to_y_model("caffe_scale", nodes, inits, 12)


def test_affine_chains_fold():
    mod = SimplifyInference()(load_onnx(caffe_scale_model(), name="m").mod)
    after = op_counts(mod)
    # Conv, bias, BN and Scale are one conv + one add; the second BN (x * s + t) is used twice and
    # stays, its Scale (one Mul, one Add) stays apart from it; the final Add.
    assert after["relax.nn.conv2d"] == 1
    assert (after["relax.multiply"], after["relax.add"]) == (2, 4)
    # Folding the shared BN into its Scale would compute it twice: two multiplies of the concat.
    ops = {b.var: b.value.op.name for block in mod["main"].body.blocks for b in block.bindings}
    multiplies = [
        b.value for block in mod["main"].body.blocks for b in block.bindings if ops[b.var] == "relax.multiply"
    ]
    assert sorted(ops.get(m.args[0]) for m in multiplies) == ["relax.add", "relax.concat"]


def test_lone_batch_norm_is_affine_and_dropout_gone():
    before = load_onnx(concat_bn_scale_model(), name="m").mod
    assert op_counts(before)["relax.nn.dropout"] == 1
    after = op_counts(SimplifyInference()(before))
    assert after["relax.nn.batch_norm"] == after["relax.nn.dropout"] == 0
    # x * scale + shift with the model's own Mul folded in: no subtract, divide or sqrt on the data path.
    assert after["relax.subtract"] == after["relax.divide"] == after["relax.sqrt"] == 0
    assert (after["relax.multiply"], after["relax.add"]) == (1, 1)


def channel_shuffle_model() -> onnx.ModelProto:
    """Conv -> ReLU -> ShuffleNet's channel shuffle (2 groups of 4) -> Conv."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype("float32"), "w1"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype("float32"), "w2"),
        numpy_helper.from_array(np.array([1, 2, 4, 12, 12], "int64"), "grouped"),
        numpy_helper.from_array(np.array([1, 8, 12, 12], "int64"), "merged"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "grouped"], ["g"]),
        helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t", "merged"], ["s"]),
        helper.make_node("Conv", ["s", "w2"], ["y"]),
    ]
    return x_to_y_model("channel_shuffle", nodes, inits, 8)


def channels_last_calls(model: onnx.ModelProto) -> tuple[relax.Function, list[relax.VarBinding]]:
    main = ChannelsLast()(SimplifyInference()(load_onnx(model, name="m").mod))["main"]
    return main, [b for block in main.body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]


@pytest.mark.parametrize("model", [conv_bn_sum_model, concat_bn_scale_model])
def test_channels_last_transposes_only_at_the_boundary(model):
    main, bindings = channels_last_calls(model())
    convs = [b.value for b in bindings if b.value.op == tvm.ir.Op.get("relax.nn.conv2d")]
    assert convs and all((c.attrs.data_layout, c.attrs.kernel_layout) == ("NHWC", "OHWI") for c in convs)
    # The input in and the output out, nothing in between (a (C, 1, 1) constant left its Mul and the
    # concat before it in NCHW); weights and per-channel constants were permuted at compile time.
    permutes = [b for b in bindings if b.value.op == tvm.ir.Op.get("relax.permute_dims")]
    outputs = list(main.body.body.fields) if isinstance(main.body.body, relax.Tuple) else [main.body.body]
    assert len(permutes) == 2
    assert any(permutes[0].value.args[0].same_as(p) for p in main.params)
    assert any(permutes[1].var.same_as(o) for o in outputs)


def test_channel_shuffle_stays_channels_last():
    _, bindings = channels_last_calls(channel_shuffle_model())
    permutes = [b.value for b in bindings if b.value.op == tvm.ir.Op.get("relax.permute_dims")]
    # The input's and the output's transpose, and the shuffle's swap of (groups, channels per group)
    # on the last two axes: no round trip to NCHW and back around the shuffle.
    assert [[int(a) for a in p.attrs.axes] for p in permutes] == [[0, 2, 3, 1], [0, 1, 2, 4, 3], [0, 3, 1, 2]]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("model", "kernels"),
    [
        # Five kernels without the pass (two convs, two batch norms, the sum): the BNs fold into
        # the convs, the sum and the lone BN+ReLU into the second conv's epilogue.
        (conv_bn_sum_model, 2),
        # Four without (conv, concat+BN, Mul+ReLU, dropout): the BN fuses on into Mul+ReLU.
        (concat_bn_scale_model, 2),
        # Conv+ReLU, the shuffle (reshape, transpose, reshape: one kernel), conv.
        (channel_shuffle_model, 3),
        # Conv (scale folded in) + bias + ReLU; concat + BN + Scale + ReLU + Add.
        (caffe_scale_model, 2),
    ],
)
def test_fewer_kernels_same_result(model, kernels, channels_last):
    model = model()
    tenant = load_onnx(model, name="m")
    target = host_target()
    lowered = LowerKernels(target, channels_last=channels_last)(tenant.mod)
    names = [gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    # NHWC adds at most the input's and the output's transpose (they fuse into injective neighbours).
    assert len(names) <= kernels + 2 * channels_last, names
    assert len(names) >= kernels, names
    x = np.random.default_rng(1).standard_normal((1, 4, 12, 12)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(lowered, target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x))
    got = (got[0] if isinstance(got, tvm.ir.Array) else got).numpy()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
