"""ChannelsLast: convert convolutions and the operators between them to NHWC."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call

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
            relax.transform.CanonicalizeBindings(),
        ],
        name="ChannelsLast",
    )
