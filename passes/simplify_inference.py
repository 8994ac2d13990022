"""SimplifyInference: fold what inference never changes into fewer, fusable operators."""

from __future__ import annotations

import functools

import tvm
from tvm import relax
from tvm.relax.dpl import TuplePattern, is_op, rewrite_call, wildcard

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


def SimplifyInference() -> tvm.transform.Pass:  # noqa: N802
    """Fold batch norms into the convolutions before them, decompose the rest, turn ONNX Sum into adds."""
    # ONNX Runtime does the same at graph level; without it ResNet-50 spends an eighth of its time
    # in batch-norm, ReLU and Sum kernels that a convolution's epilogue does for free.
    return tvm.transform.Sequential(
        [
            relax.transform.FoldBatchnormToConv2D(),
            relax.transform.DecomposeOpsForInference(),
            # A decomposed batch norm leaves (y, mean, var)[0]; the tuple would keep y's
            # producer and consumer in separate kernels.
            relax.transform.CanonicalizeBindings(),
            _sum_to_add,
            relax.transform.FoldConstant(),
        ],
        name="SimplifyInference",
    )
