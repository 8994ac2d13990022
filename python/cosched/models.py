"""The real model graphs that ship inside the ``onnx`` package, with seeded random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import CoschedError

LIGHT_MODELS = (
    "squeezenet",
    "shufflenet",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "densenet121",
    "bvlc_alexnet",
    "vgg19",
    "zfnet512",
)


def light_model_path(name: str) -> Path:
    """Path of ``light_<name>.onnx`` inside the installed ``onnx`` package."""
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.exists():
        raise CoschedError(
            f"no light model named {name!r} in the onnx package",
            tenant=name,
            hint=f"pick one of {', '.join(LIGHT_MODELS)}",
        )
    return path


def _random_tensor(
    rng: np.random.Generator, shape: tuple[int, ...], op: str, index: int, node: onnx.NodeProto
) -> np.ndarray:
    """A value for a weight that keeps activations of a deep net in a sane range."""
    if op == "Conv" and index == 1:
        fan_in = int(np.prod(shape[1:])) or 1
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    if op == "Gemm" and index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        fan_in = shape[1] if trans_b else shape[0]
        return rng.normal(0.0, np.sqrt(1.0 / max(fan_in, 1)), shape)
    if op == "BatchNormalization" and index == 1:  # scale < 1 keeps residual sums from exploding
        return rng.uniform(0.2, 0.5, shape)
    if op == "BatchNormalization" and index == 4:  # variance: positive
        return rng.uniform(0.5, 1.5, shape)
    if op == "Mul":
        return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0.0, 0.05, shape)


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace the light models' constant weights (``ConstantOfShape`` or float initializers) by seeded random ones."""
    rng = np.random.default_rng(seed)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    consumers: dict[str, tuple[onnx.NodeProto, int]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, (node, i))
    inits = {init.name: init for init in graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type == "ConstantOfShape" and node.input[0] in inits and out in consumers:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            dtype = numpy_helper.to_array(value).dtype if value is not None else np.float32
            if np.issubdtype(dtype, np.floating):
                shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
                cnode, idx = consumers[out]
                arr = _random_tensor(rng, shape, cnode.op_type, idx, cnode).astype(dtype)
                new_inits.append(numpy_helper.from_array(arr, out))
                continue
        kept.append(node)
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if np.issubdtype(arr.dtype, np.floating) and init.name in consumers:
            cnode, idx = consumers[init.name]
            rand = _random_tensor(rng, arr.shape, cnode.op_type, idx, cnode).astype(arr.dtype)
            init.CopyFrom(numpy_helper.from_array(rand, init.name))
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    if model.ir_version < 4:  # IR < 4 lists every initializer as a graph input too
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in new_inits)
    # Shape initializers that only fed the removed ConstantOfShape nodes are now dead.
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    live = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    dead_inputs = [i for i in graph.input if i.name not in used]
    for i in dead_inputs:
        graph.input.remove(i)
    onnx.checker.check_model(model)
    return model


def light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """A light model from the onnx package with seeded random weights."""
    return randomize_weights(onnx.load(str(light_model_path(name))), seed)


def tiny_cnn(
    name: str = "tiny", seed: int = 0, width: int = 8, depth: int = 2, size: int = 16, classes: int = 10
) -> onnx.ModelProto:
    """A small CNN (conv-relu blocks, pooling, a residual add, gemm, softmax) that compiles in seconds."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(wname: str, shape: tuple[int, ...], scale: float) -> str:
        inits.append(numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), wname))
        return wname

    x, channels = "input", 3
    for i in range(depth):
        w = weight(f"w{i}", (width, channels, 3, 3), np.sqrt(2 / (channels * 9)))
        b = weight(f"b{i}", (width,), 0.05)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        if i > 0:  # a residual edge gives the graph a branch
            nodes.append(helper.make_node("Add", [f"r{i}", x], [f"a{i}"]))
            x = f"a{i}"
        else:
            x = f"r{i}"
        channels = width
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("GlobalAveragePool", ["pool"], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    wf = weight("wf", (width, classes), np.sqrt(1 / width))
    bf = weight("bf", (classes,), 0.05)
    nodes.append(helper.make_node("Gemm", ["flat", wf, bf], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], axis=1))
    return graph_model(name, nodes, inits, ("input", [1, 3, size, size]), ("prob", [1, classes]))


def graph_model(
    name: str,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    input_: tuple[str, list[int]],
    output: tuple[str, list[int]],
    opset: int = 13,
) -> onnx.ModelProto:
    """A checked float32 ONNX model of ``nodes`` from one named input to one named output."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(input_[0], onnx.TensorProto.FLOAT, input_[1])],
        [helper.make_tensor_value_info(output[0], onnx.TensorProto.FLOAT, output[1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="cosched")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


__all__ = ["LIGHT_MODELS", "graph_model", "light_model", "light_model_path", "randomize_weights", "tiny_cnn"]
