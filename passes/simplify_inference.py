"""SimplifyInference: fold what inference never changes into fewer, fusable operators."""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import TupleGetItemPattern, TuplePattern, is_const, is_op, rewrite_call, wildcard

MAX_SUM_INPUTS = 8
"""ONNX ``Sum`` nodes with up to this many inputs become chains of adds."""


def _sum_patterns() -> list[tuple[relax.dpl.DFPattern, list[relax.dpl.DFPattern]]]:
    patterns = []
    for n in range(2, MAX_SUM_INPUTS + 1):
        inputs = [wildcard() for _ in range(n)]
        stacked = is_op("relax.stack")(TuplePattern([is_op("relax.broadcast_to")(x, wildcard()) for x in inputs]))
        patterns.append((is_op("relax.sum")(stacked), inputs))
    return patterns


@relax.transform.function_pass(opt_level=0, name="cosched.SumToAdd")
def _sum_to_add(func: relax.Function, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> relax.Function:
    # The ONNX frontend imports Sum as broadcast, stack and reduce: a kernel of its own that
    # writes every input once more. Adds broadcast the same way and fuse into the producer.
    for pattern, inputs in _sum_patterns():

        def rewriter(expr, matches, pattern=pattern, inputs=inputs):
            call = matches[pattern]
            if [int(a) for a in call.attrs.axis or []] != [0] or call.attrs.keepdims:
                return expr
            return functools.reduce(relax.op.add, [matches[x] for x in inputs])

        func = rewrite_call(pattern, rewriter, func)
    return func


@relax.transform.function_pass(opt_level=0, name="cosched.FoldBatchNormIntoConv")
def _fold_bn_into_conv(func: relax.Function, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> relax.Function:
    # relax.transform.FoldBatchnormToConv2D builds the folded weights as Relax ops that FoldConstant
    # then compiles one by one (19 s for ResNet-50); numpy gives the same float32 values at once.
    data, weight = wildcard(), is_const()
    conv = is_op("relax.nn.conv2d")(data, weight)
    params = [is_const() for _ in range(4)]
    norm = is_op("relax.nn.batch_norm")(conv, *params)
    pattern = TupleGetItemPattern(norm, 0)

    def rewriter(expr, matches):
        conv_attrs, bn_attrs = matches[conv].attrs, matches[norm].attrs
        if (conv_attrs.data_layout, conv_attrs.kernel_layout, int(bn_attrs.axis)) != ("NCHW", "OIHW", 1):
            return expr
        w = matches[weight].value.numpy()
        gamma, beta, mean, var = (matches[p].value.numpy() for p in params)
        if w.dtype != np.float32:
            return expr
        gamma = gamma if bn_attrs.scale else np.ones_like(gamma)
        beta = beta if bn_attrs.center else np.zeros_like(beta)
        scale = gamma / np.sqrt(var + np.float32(bn_attrs.epsilon))
        shift = beta - mean * scale
        folded = relax.Call(matches[conv].op, [matches[data], relax.const(w * scale.reshape(-1, 1, 1, 1))], conv_attrs)
        return relax.op.add(folded, relax.const(shift.reshape(1, -1, 1, 1)))

    return rewrite_call(pattern, rewriter, func)


def SimplifyInference() -> tvm.transform.Pass:  # noqa: N802
    """Fold batch norms into the convolutions before them, decompose the rest, turn ONNX Sum into adds."""
    # ONNX Runtime does the same at graph level; without it ResNet-50 spends an eighth of its time
    # in batch-norm, ReLU and Sum kernels that a convolution's epilogue does for free.
    return tvm.transform.Sequential(
        [
            _fold_bn_into_conv,
            relax.transform.DecomposeOpsForInference(),
            # A decomposed batch norm leaves (y, mean, var)[0]; the tuple would keep y's
            # producer and consumer in separate kernels.
            relax.transform.CanonicalizeBindings(),
            _sum_to_add,
            relax.transform.FoldConstant(),
        ],
        name="SimplifyInference",
    )
