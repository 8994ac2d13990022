"""SimplifyInference: fold what inference never changes into fewer, fusable operators."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable

import numpy as np
import tvm
import tvm_ffi
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


def _bn_scale_shift(attrs, gamma, beta, mean, var) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) with batch_norm(x) == x * scale + shift at inference."""
    gamma = gamma if attrs.scale else np.ones_like(gamma)
    beta = beta if attrs.center else np.zeros_like(beta)
    scale = gamma / np.sqrt(var + np.float32(attrs.epsilon))
    return scale, beta - mean * scale


@relax.transform.function_pass(opt_level=0, name="cosched.BatchNormToAffine")
def _bn_to_affine(func: relax.Function, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> relax.Function:
    # A batch norm is x * scale + shift (after a convolution the scale then folds into its weights,
    # _scale_into_conv); DecomposeOpsForInference would leave (x - mean) / sqrt(var + eps) * gamma + beta
    # with per-channel constants of rank 3 (C, 1, 1), four kernel inputs instead of two, which
    # ConvertLayout cannot carry to NHWC.
    data = wildcard()
    params = [is_const() for _ in range(4)]
    norm = is_op("relax.nn.batch_norm")(data, *params)
    pattern = TupleGetItemPattern(norm, 0)

    def rewriter(expr, matches):
        attrs = matches[norm].attrs
        values = [matches[p].value.numpy() for p in params]
        ndim = int(matches[data].ty.ndim)
        if ndim < 1 or any(v.dtype != np.float32 or v.ndim != 1 for v in values):
            return expr  # unknown rank or another dtype: left to DecomposeOpsForInference
        scale, shift = _bn_scale_shift(attrs, *values)
        shape = [1] * ndim
        shape[int(attrs.axis) % ndim] = -1
        scaled = relax.op.multiply(matches[data], relax.const(scale.reshape(shape)))
        return relax.op.add(scaled, relax.const(shift.reshape(shape)))

    return rewrite_call(pattern, rewriter, func)


def _single_uses(func: relax.Function) -> set[relax.Expr]:
    """Bound values whose variable is used exactly once (folding into its user duplicates nothing)."""
    uses: dict[relax.Var, int] = collections.Counter()
    value_of: dict[relax.Var, relax.Expr] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value_of[binding.var] = binding.value
            for var in relax.analysis.free_vars(binding.value):
                uses[var] += 1
    for var in relax.analysis.free_vars(func.body.body):
        uses[var] += 1
    return {value for var, value in value_of.items() if uses[var] == 1}


def _either_order(op: str, tensor, constant):
    return is_op(op)(tensor, constant) | is_op(op)(constant, tensor)


def _float32_const(expr: relax.Expr) -> np.ndarray | None:
    value = expr.value.numpy()
    return value if value.dtype == np.float32 else None


def _affine_rules() -> list[tuple[relax.dpl.DFPattern, relax.dpl.DFPattern, Callable]]:
    """(pattern, inner pattern, rewrite) for a constant affine op applied to another one."""
    rules = []
    for outer, inner_op, combine in [
        # (y * a) * c = y * (a c);  (y + b) + d = y + (b + d);  (y + b) * c = y c + b c
        ("relax.multiply", "relax.multiply", lambda y, a, c: relax.op.multiply(y, relax.const(a * c))),
        ("relax.add", "relax.add", lambda y, b, d: relax.op.add(y, relax.const(b + d))),
        (
            "relax.multiply",
            "relax.add",
            lambda y, b, c: relax.op.add(relax.op.multiply(y, relax.const(c)), relax.const(b * c)),
        ),
    ]:
        y, a, c = wildcard(), is_const(), is_const()
        inner = _either_order(inner_op, y, a)
        rules.append((_either_order(outer, inner, c), inner, (y, a, c, combine)))
    return rules


@relax.transform.function_pass(opt_level=0, name="cosched.FoldAffineChains")
def _fold_affine_chains(func: relax.Function, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> relax.Function:
    # Caffe exports (DenseNet-121, Inception-v2) follow every batch norm with a Scale layer: two
    # per-channel affines in a row, and after a convolution a second one the batch-norm fold
    # missed. One affine, or none after a convolution, is two constant inputs less per kernel.
    for _ in range(8):  # each round folds one more link of every chain
        before = func
        for pattern, inner, (y, a, c, combine) in _affine_rules():
            single = _single_uses(func)

            def rewriter(expr, matches, inner=inner, y=y, a=a, c=c, combine=combine, single=single):
                first, second = _float32_const(matches[a]), _float32_const(matches[c])
                if matches[inner] not in single or first is None or second is None:
                    return expr
                if not tvm_ffi.structural_equal(matches[y].ty, expr.ty):
                    return expr  # the constants would broadcast the tensor to a bigger shape
                return combine(matches[y], first, second)

            func = rewrite_call(pattern, rewriter, func)
        func = _scale_into_conv(func)
        if tvm_ffi.structural_equal(func, before):
            break
    return func


def _scale_into_conv(func: relax.Function) -> relax.Function:
    """conv2d(x, W) * c = conv2d(x, W c) for a per-output-channel (or scalar) constant c."""
    # relax.transform.FoldBatchnormToConv2D builds the folded weights as Relax ops that FoldConstant
    # then compiles one by one (19 s for ResNet-50); numpy gives the same float32 values at once.
    data, weight, scale = wildcard(), is_const(), is_const()
    conv = is_op("relax.nn.conv2d")(data, weight)
    pattern = _either_order("relax.multiply", conv, scale)
    single = _single_uses(func)

    def rewriter(expr, matches):
        attrs, w, c = matches[conv].attrs, _float32_const(matches[weight]), _float32_const(matches[scale])
        if matches[conv] not in single or w is None or c is None:
            return expr
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
            return expr
        if c.size != 1 and c.shape != (1, w.shape[0], 1, 1):
            return expr
        scaled = relax.const(w * c.reshape(-1, 1, 1, 1) if c.size > 1 else w * c.reshape(()))
        return relax.Call(matches[conv].op, [matches[data], scaled], attrs)

    return rewrite_call(pattern, rewriter, func)


BROADCAST_OPS = ("relax.add", "relax.multiply", "relax.subtract", "relax.divide")


@relax.transform.function_pass(opt_level=0, name="cosched.RankConstants")
def _rank_constants(func: relax.Function, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> relax.Function:
    # ONNX exports often scale channels by a (C, 1, 1) constant; broadcasting pads it to (1, C, 1, 1).
    # Written out at full rank, ConvertLayout can permute it with the tensor (it leaves mixed ranks
    # in NCHW, between two transposes).
    for op in BROADCAST_OPS:
        for const_first in (False, True):
            tensor, constant = wildcard(), is_const()
            pattern = is_op(op)(constant, tensor) if const_first else is_op(op)(tensor, constant)

            def rewriter(expr, matches, tensor=tensor, constant=constant, pattern=pattern, const_first=const_first):
                rank, value = matches[tensor].ty.ndim, matches[constant].value.numpy()
                if rank is None or int(rank) <= value.ndim:
                    return expr
                padded = relax.const(value.reshape((1,) * (int(rank) - value.ndim) + value.shape))
                args = [padded, matches[tensor]] if const_first else [matches[tensor], padded]
                return relax.Call(matches[pattern].op, args, matches[pattern].attrs)

            func = rewrite_call(pattern, rewriter, func)
    return func


@relax.transform.function_pass(opt_level=0, name="cosched.RemoveDropout")
def _remove_dropout(func: relax.Function, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> relax.Function:
    # Dropout is the identity at inference, yet it stays a tuple-valued op: it costs a copy kernel,
    # and ConvertLayout cannot carry a layout through it.
    data = wildcard()
    pattern = TupleGetItemPattern(is_op("relax.nn.dropout")(data), 0)
    return rewrite_call(pattern, lambda _expr, matches: matches[data], func)


def SimplifyInference() -> tvm.transform.Pass:  # noqa: N802
    """Fold batch norms into the convolutions before them, decompose the rest, drop dropout, turn Sum into adds,
    merge chains of per-channel affines (into the convolution before them where there is one)."""
    # ONNX Runtime does the same at graph level; without it ResNet-50 spends an eighth of its time
    # in batch-norm, ReLU and Sum kernels that a convolution's epilogue does for free.
    return tvm.transform.Sequential(
        [
            _bn_to_affine,
            _remove_dropout,
            _rank_constants,
            relax.transform.DecomposeOpsForInference(),
            # A decomposed batch norm leaves (y, mean, var)[0]; the tuple would keep y's
            # producer and consumer in separate kernels.
            relax.transform.CanonicalizeBindings(),
            _sum_to_add,
            relax.transform.FoldConstant(),
            # After FoldConstant: the Scale layers' factors are only constants once it evaluated them.
            _fold_affine_chains,
        ],
        name="SimplifyInference",
    )
