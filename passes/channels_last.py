"""ChannelsLast: convert convolutions and the operators between them to NHWC."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from .graph import static_shape

DESIRED_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "OHWI"]}
"""Data and kernel layout of every 2-D convolution after ``ChannelsLast``."""


@relax.transform.function_pass(opt_level=0, name="cosched.FoldConstantPermutes")
def _fold_constant_permutes(
    func: relax.Function, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext
) -> relax.Function:
    # ConvertLayout permutes every weight and bias; FoldConstant would compile one kernel per constant.
    constant = is_const()
    pattern = is_op("relax.permute_dims")(constant)

    def rewriter(expr, matches):
        value = matches[constant].value.numpy()
        axes = matches[pattern].attrs.axes
        axes = None if axes is None else [int(a) for a in axes]
        return relax.const(np.ascontiguousarray(np.transpose(value, axes)))

    return rewrite_call(pattern, rewriter, func)


def _static_shape(expr: relax.Expr) -> list[int] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape.values]
    except TypeError:
        return None


@relax.transform.function_pass(opt_level=0, name="cosched.ShuffleChannelsLast")
def _shuffle_channels_last(func: relax.Function, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> relax.Function:
    # ConvertLayout has no layout rule for ShuffleNet's channel shuffle (reshape to groups, swap, merge),
    # so it transposes to NCHW and back around it. The same shuffle on the last axis: split C into
    # (g, C/g), swap the two, merge. The tuned kernel was no faster for it (0.67 ms per ShuffleNet
    # inference either way); the graph stays NHWC, so no layout change hides in a fused kernel.
    data = wildcard()
    to_nchw = is_op("relax.permute_dims")(data)
    split = is_op("relax.reshape")(to_nchw, wildcard())
    swap = is_op("relax.permute_dims")(split)
    merge = is_op("relax.reshape")(swap, wildcard())
    pattern = is_op("relax.permute_dims")(merge)

    def axes(call: relax.Call) -> list[int] | None:
        return None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]

    def rewriter(expr, matches):
        shape = static_shape(matches[data].ty)
        if shape is None or len(shape) != 4:
            return expr
        n, h, w, c = shape
        split_shape = static_shape(matches[split].ty)
        if (
            axes(matches[to_nchw]) != [0, 3, 1, 2]
            or axes(matches[swap]) != [0, 2, 1, 3, 4]
            or axes(matches[pattern]) != [0, 2, 3, 1]
            or split_shape is None
            or len(split_shape) != 5
            or [split_shape[0], split_shape[1] * split_shape[2], *split_shape[3:]] != [n, c, h, w]
            or static_shape(matches[merge].ty) != [n, c, h, w]
        ):
            return expr
        groups = split_shape[1]
        grouped = relax.op.reshape(matches[data], (n, h, w, groups, c // groups))
        return relax.op.reshape(relax.op.permute_dims(grouped, [0, 1, 2, 4, 3]), (n, h, w, c))

    return rewrite_call(pattern, rewriter, func)


def ChannelsLast() -> tvm.transform.Pass:  # noqa: N802
    """Lay convolutions out as NHWC (weights OHWI) and carry the layout through the operators between them."""
    # In NCHW a CPU kernel vectorizes along the image width, 7-56 wide in ResNet-50; NHWC puts 64-2048
    # channels innermost. Tuned with the same trials, four ResNet-50 convolutions ran 1.13-1.63x faster
    # (benchmarks/conv_layout.py).
    # Only the model's inputs and outputs and operators without a layout rule pay a transpose.
    return tvm.transform.Sequential(
        [
            relax.transform.ConvertLayout(DESIRED_LAYOUTS),
            _fold_constant_permutes,
            _shuffle_channels_last,
            relax.transform.CanonicalizeBindings(),
        ],
        name="ChannelsLast",
    )
