"""ConcatInPlace: the kernels that feed a concatenation write straight into its output."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, te, tirx, topi
from tvm.ir.expr import TensorLoad, TensorRegion
from tvm.s_tir import SBlock

from .graph import CALL_TIR, main_block, static_shape, substitute_vars


def _blocks(func: tirx.PrimFunc) -> list[SBlock]:
    found: list[SBlock] = []
    tvm_ffi.structural_walk(func.body, [(SBlock, found.append)])
    return [b for b in found if b.name_hint != "root"]


def _is_concat(func: tirx.PrimFunc, num_inputs: int, axis: int) -> bool:
    """Whether ``func`` computes TVM's own concatenation along ``axis``, however it was scheduled.

    Scheduling moves loops, not the compute block, so the block is compared with the one
    ``topi.concatenate`` produces: a name would be a guess, the block is the semantics.
    """
    if len(func.params) != num_inputs + 1:
        return False
    # The parameters' own shapes, so index types (int64 after legalization) match too.
    ins = [te.placeholder(p.ty.shape, p.ty.dtype) for p in func.params[:-1]]
    ref_func = te.create_prim_func([*ins, topi.concatenate(ins, axis)])
    ref, got = _blocks(ref_func), _blocks(func)
    if len(got) != 1 or len(ref) != 1:
        return False
    # The parameters come first, so their buffers map in parameter order: a kernel that
    # concatenated its inputs in another order would not match.
    return tvm_ffi.structural_equal(
        [list(func.params), got[0].iter_vars, got[0].body],
        [list(ref_func.params), ref[0].iter_vars, ref[0].body],
        map_free_vars=True,
    )


def _concat_axis(func: tirx.PrimFunc, shapes: list[list[int]], out_shape: list[int]) -> int | None:
    """The axis ``func`` concatenates inputs of ``shapes`` along, or None if it is no concatenation."""
    if any(len(s) != len(out_shape) for s in shapes):
        return None
    for axis in range(len(out_shape)):
        others_match = all(s[d] == out_shape[d] for s in shapes for d in range(len(s)) if d != axis)
        if others_match and sum(s[axis] for s in shapes) == out_shape[axis] and _is_concat(func, len(shapes), axis):
            return axis
    return None


def _write_into(func: tirx.PrimFunc, shape: list[int], axis: int, offset: int) -> tirx.PrimFunc | None:
    """``func`` with its output (last parameter) widened to ``shape``, written at ``offset`` along ``axis``."""
    out = func.params[-1]
    full = tirx.decl_buffer(shape, out.ty.dtype, name=out.name)

    def shift(indices):
        return [i + offset if d == axis else i for d, i in enumerate(indices)]

    def load(node: TensorLoad):
        return tirx.BufferLoad(full, shift(node.indices)) if node.source.same_as(out) else node

    def store(node: tirx.stmt.BufferStore):
        return tirx.BufferStore(full, node.value, shift(node.indices)) if node.buffer.same_as(out) else node

    def region(node: TensorRegion):
        if not node.source.same_as(out):
            return node
        ranges = [
            tvm.ir.Range.from_min_extent(r.min + offset, r.extent) if d == axis else r
            for d, r in enumerate(node.region)
        ]
        return tirx.BufferRegion(full, ranges)

    # A buffer matched onto a region would need its own offset; schedules cosched applies make none.
    if any(len(block.match_buffers) for block in _blocks(func)):
        return None
    body = tvm_ffi.structural_map(
        func.body, [(TensorLoad, load), (tirx.stmt.BufferStore, store), (TensorRegion, region)]
    )
    return tirx.PrimFunc([*func.params[:-1], full], body, func.ret_type, func.attrs)


def _rewrite(mod: tvm.IRModule) -> tvm.IRModule:
    func = mod["main"]
    block = main_block(func)
    bindings = list(block.bindings)
    position = {b.var: i for i, b in enumerate(bindings)}
    uses: dict[relax.Var, int] = {}

    def count(expr) -> None:
        tvm_ffi.structural_walk(expr, [(relax.Var, lambda v: uses.__setitem__(v, uses.get(v, 0) + 1))])

    for b in bindings:
        count(b.value)
    count(func.body.body)

    def tir_producer(var) -> relax.Call | None:
        """The single-output call_tir that binds ``var``, if nothing else reads it."""
        if not isinstance(var, relax.Var) or var not in position or uses.get(var) != 1:
            return None
        value = bindings[position[var]].value
        if not (isinstance(value, relax.Call) and value.op.same_as(CALL_TIR) and len(value.args) == 2):
            return None
        callee = mod[value.args[0]]
        if not isinstance(callee, tirx.PrimFunc) or static_shape(var.ty) is None:
            return None
        return value

    builder = relax.BlockBuilder(mod)
    new_values: dict[int, relax.Call] = {}  # binding index -> the producer's new call
    final_var: dict[int, relax.Var] = {}  # last writer's binding index -> the concatenation's variable
    dropped: set[int] = set()  # the concatenations' bindings
    for i, b in enumerate(bindings):
        call = b.value
        if not (isinstance(call, relax.Call) and call.op.same_as(CALL_TIR)):
            continue
        callee = mod[call.args[0]]
        out_shape = static_shape(b.var.ty)
        if not isinstance(callee, tirx.PrimFunc) or out_shape is None or not isinstance(call.args[1], relax.Tuple):
            continue
        parts = list(call.args[1].fields)
        producers = [tir_producer(p) for p in parts]
        if len(parts) < 2 or any(p is None for p in producers) or len(set(parts)) != len(parts):
            continue
        shapes = [static_shape(p.ty) for p in parts]
        axis = _concat_axis(callee, shapes, out_shape)
        if axis is None:
            continue
        offsets = [sum(s[axis] for s in shapes[:k]) for k in range(len(shapes))]
        widened = [_write_into(mod[p.args[0]], out_shape, axis, o) for p, o in zip(producers, offsets, strict=True)]
        if any(w is None for w in widened):
            continue
        # The first writer allocates the concatenation; each later one updates it in place, which
        # also orders the writers (they write disjoint slices, but the storage must exist first).
        previous = None
        for part, producer, offset, kernel in sorted(
            zip(parts, producers, offsets, widened, strict=True), key=lambda r: position[r[0]]
        ):
            # One kernel may feed several parts (Inception's twin branches): the offset tells them apart.
            gv = builder.add_func(kernel, f"{producer.args[0].name_hint}_into_{b.var.name}_{offset}")
            args = list(producer.args[1].fields)
            index = position[part]
            if previous is None:
                new_values[index] = relax.call_tir(gv, relax.Tuple(args), b.var.ty)
            else:
                updated = bindings[previous].var
                new_values[index] = relax.op.call_tir_inplace(gv, relax.Tuple([*args, updated]), [len(args)], b.var.ty)
            previous = index
        # The last writer binds the concatenation's own variable (it may be a dataflow output).
        final_var[previous] = b.var
        dropped.add(i)
    if not new_values:
        return mod
    var_map: dict[relax.Var, relax.Var] = {}
    new_bindings = []
    for i, b in enumerate(bindings):
        if i in dropped:
            continue
        value = new_values.get(i, b.value)
        if i in new_values:  # the producer's result is now the whole concatenation
            var_map[b.var] = final_var[i] if i in final_var else relax.DataflowVar(b.var.name, value.ty_args[0])
        new_bindings.append(relax.VarBinding(var_map.get(b.var, b.var), substitute_vars(value, var_map)))
    body = relax.SeqExpr([relax.DataflowBlock(new_bindings)], substitute_vars(func.body.body, var_map))
    new_mod = builder.get()
    new_mod["main"] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    return relax.transform.DeadCodeElimination(["main"])(new_mod)


def ConcatInPlace() -> tvm.transform.Pass:  # noqa: N802
    """Let the kernels that feed a concatenation write into its output, removing the copy kernel."""

    @tvm.transform.module_pass(opt_level=0, name="cosched.ConcatInPlace")
    def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return _rewrite(mod)

    return apply
