"""ConcatInPlace: the kernels that feed a concatenation write straight into its output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import relax, te, tirx, topi
from tvm.ir.expr import TensorLoad, TensorRegion
from tvm.s_tir import SBlock

from .graph import ATTR_SLICE_BYTES, CALL_TIR, main_block, static_shape


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


def _widen(func: tirx.PrimFunc, index: int, shape: list[int], axis: int, offset: int) -> tirx.PrimFunc:
    """``func`` with parameter ``index`` widened to ``shape`` and accessed at ``offset`` along ``axis``.

    The output parameter widened makes the kernel write its slice of a concatenation; an input
    widened makes it read a slice (a part, or an earlier concatenation in a chain) from there.
    The kernel's ``ATTR_SLICE_BYTES`` records the slice's size, as it touches no more of the buffer.
    """
    param = func.params[index]
    full = tirx.decl_buffer(shape, param.ty.dtype, name=param.name)
    sliced = dict(func.attrs[ATTR_SLICE_BYTES]) if func.attrs is not None and ATTR_SLICE_BYTES in func.attrs else {}
    sliced[index] = math.prod(int(d) for d in param.ty.shape) * tvm.DataType(param.ty.dtype).itemsize

    def shift(indices):
        return [i + offset if d == axis else i for d, i in enumerate(indices)]

    def load(node: TensorLoad):
        return tirx.BufferLoad(full, shift(node.indices)) if node.source.same_as(param) else node

    def store(node: tirx.stmt.BufferStore):
        return tirx.BufferStore(full, node.value, shift(node.indices)) if node.buffer.same_as(param) else node

    def region(node: TensorRegion):
        if not node.source.same_as(param):
            return node
        ranges = [
            tvm.ir.Range.from_min_extent(r.min + offset, r.extent) if d == axis else r
            for d, r in enumerate(node.region)
        ]
        return tirx.BufferRegion(full, ranges)

    body = tvm_ffi.structural_map(
        func.body, [(TensorLoad, load), (tirx.stmt.BufferStore, store), (TensorRegion, region)]
    )
    params = list(func.params)
    params[index] = full
    return tirx.PrimFunc(params, body, func.ret_type, func.attrs).with_attr(ATTR_SLICE_BYTES, sliced)


def _has_match_buffers(func: tirx.PrimFunc) -> bool:
    # A buffer matched onto a region would need its own offset; schedules cosched applies make none.
    return any(len(block.match_buffers) for block in _blocks(func))


@dataclass
class _Concat:
    """A concatenation kernel's binding: its parts (variables) and where each starts along ``axis``."""

    axis: int
    parts: list[relax.Var]
    offsets: list[int]


@dataclass
class _Root:
    """A concatenation whose buffer its parts' producers write; chained concatenations become views."""

    var: relax.Var
    shape: list[int]
    axis: int
    writers: dict[int, int] = field(default_factory=dict)  # producer's binding index -> offset
    views: dict[relax.Var, int] = field(default_factory=dict)  # variable read elsewhere -> offset
    dropped: set[int] = field(default_factory=set)  # the concatenations' own bindings


@dataclass
class _Main:
    """``main``'s bindings and who reads each variable."""

    mod: tvm.IRModule
    bindings: list[relax.Binding]
    position: dict[relax.Var, int]
    readers: dict[relax.Var, list[int]]
    """Variable -> bindings that pass it to a kernel."""
    elsewhere: set[relax.Var]
    """Variables used any other way (returned, in a tuple, ...)."""

    @classmethod
    def of(cls, mod: tvm.IRModule) -> _Main:
        func = mod["main"]
        bindings = list(main_block(func).bindings)
        main = cls(mod, bindings, {b.var: i for i, b in enumerate(bindings)}, {}, set())
        for i, b in enumerate(bindings):
            main._note(b.value, i)
        main._note(func.body.body, None)
        return main

    def kernel(self, i: int) -> tirx.PrimFunc | None:
        """The PrimFunc binding ``i`` calls with plain ``call_tir`` (one output, no extra TIR args)."""
        value = self.bindings[i].value
        if not (isinstance(value, relax.Call) and value.op.same_as(CALL_TIR) and len(value.args) == 2):
            return None
        callee = self.mod[value.args[0]]
        if not isinstance(callee, tirx.PrimFunc) or not isinstance(value.args[1], relax.Tuple):
            return None
        return callee if static_shape(self.bindings[i].var.ty) is not None else None

    def _note(self, expr, i: int | None) -> None:
        args = expr.args[1].fields if i is not None and self.kernel(i) is not None else []
        for arg in args:
            if isinstance(arg, relax.Var):
                self.readers.setdefault(arg, []).append(i)
        found: list[relax.Var] = []
        tvm_ffi.structural_walk(expr, [(relax.Var, found.append)])
        for var in found:
            if not any(var.same_as(a) for a in args):
                self.elsewhere.add(var)


def _concatenations(main: _Main) -> dict[int, _Concat]:
    """Bindings that call a concatenation kernel, by index."""
    concats = {}
    for i, b in enumerate(main.bindings):
        callee = main.kernel(i)
        if callee is None:
            continue
        parts = list(b.value.args[1].fields)
        shapes = [static_shape(p.ty) for p in parts]
        if len(parts) < 2 or any(s is None for s in shapes) or len({id(p) for p in parts}) != len(parts):
            continue
        axis = _concat_axis(callee, shapes, static_shape(b.var.ty))
        if axis is not None:
            offsets = [sum(s[axis] for s in shapes[:k]) for k in range(len(shapes))]
            concats[i] = _Concat(axis, parts, offsets)
    return concats


def _roots(main: _Main, concats: dict[int, _Concat]) -> list[_Root]:
    """The concatenations whose buffers their parts' producers can write, each with its chain."""

    def expand(i: int, base: int, root: _Root, claimed: set) -> bool:
        """Add concatenation ``i``'s parts, at ``base`` in ``root``: producers write, chains nest."""
        concat = concats[i]
        root.dropped.add(i)
        for part, offset in zip(concat.parts, concat.offsets, strict=True):
            j = main.position.get(part)
            # Besides this concatenation, only kernels may read a part: they read its slice instead.
            others = [r for r in main.readers.get(part, []) if r != i]
            if j is None or j in claimed or j in root.writers or j in root.dropped or part in main.elsewhere:
                return False
            nested = concats.get(j)
            if nested is not None and nested.axis == concat.axis:
                if not expand(j, base + offset, root, claimed):
                    return False
            elif main.kernel(j) is not None:
                root.writers[j] = base + offset
            else:
                return False
            if others:
                root.views[part] = base + offset
        return True

    roots: list[_Root] = []
    claimed: set[int] = set()
    # Last first, so a chain is taken whole from its end (DenseNet: each block's concatenations).
    for i in sorted(concats, reverse=True):
        if i in claimed:
            continue
        var = main.bindings[i].var
        root = _Root(var, static_shape(var.ty), concats[i].axis)
        if not expand(i, 0, root, claimed):
            continue
        view_readers = {r for v in root.views for r in main.readers[v] if r not in root.dropped}
        # A writer that read its own buffer would pass it twice to one in-place call.
        if view_readers & root.writers.keys() or any(
            _has_match_buffers(main.kernel(j)) for j in view_readers | root.writers.keys()
        ):
            continue
        claimed |= root.dropped | root.writers.keys()
        roots.append(root)
    return roots


def _emit(main: _Main, roots: list[_Root]) -> tvm.IRModule:
    """``main`` with the roots' concatenations dropped, their writers and slice readers rewritten."""
    mod, bindings = main.mod, main.bindings
    # Each binding's new kernel: inputs read from a root, its output written into one, or both.
    reads: dict[int, list[tuple[int, _Root, int]]] = {}  # binding -> (argument index, root, offset)
    writes: dict[int, _Root] = {}
    for root in roots:
        for j in root.writers:
            writes[j] = root
        for var, offset in root.views.items():
            for r in main.readers[var]:
                if r not in root.dropped:
                    args = bindings[r].value.args[1].fields
                    reads.setdefault(r, []).extend((k, root, offset) for k, a in enumerate(args) if a.same_as(var))
    # The first writer allocates the root, each later one updates it in place, which orders them
    # (the slices are disjoint, but the storage must exist first); the last binds the root's variable.
    version: dict[int, relax.Var] = {}
    for root in roots:
        order = sorted(root.writers)
        for n, j in enumerate(order):
            last = n == len(order) - 1
            version[j] = root.var if last else relax.DataflowVar(f"{root.var.name}_{n}", root.var.ty)

    def current(root: _Root, i: int) -> relax.Var:
        """The root as the last of its writers before binding ``i`` left it."""
        return version[max(j for j in root.writers if j < i)]

    dropped = set().union(*(root.dropped for root in roots))
    builder = relax.BlockBuilder(mod)
    new_bindings = []
    for i, b in enumerate(bindings):
        if i in dropped:
            continue
        if i not in reads and i not in writes:
            new_bindings.append(b)
            continue
        call = b.value
        func_ = mod[call.args[0]]
        args = list(call.args[1].fields)
        name = call.args[0].name_hint
        for k, root, offset in reads.get(i, []):
            func_ = _widen(func_, k, root.shape, root.axis, offset)
            args[k] = current(root, i)
            name += f"_from_{root.var.name}_{offset}"
        if i not in writes:
            gv = builder.add_func(func_, name)
            new_bindings.append(relax.VarBinding(b.var, relax.call_tir(gv, relax.Tuple(args), b.var.ty)))
            continue
        root = writes[i]
        offset = root.writers[i]
        func_ = _widen(func_, len(func_.params) - 1, root.shape, root.axis, offset)
        # One kernel may feed several parts (Inception's twin branches): the offset tells them apart.
        gv = builder.add_func(func_, f"{name}_into_{root.var.name}_{offset}")
        if i == min(root.writers):
            value = relax.call_tir(gv, relax.Tuple(args), root.var.ty)
        else:
            updated = current(root, i)
            value = relax.op.call_tir_inplace(gv, relax.Tuple([*args, updated]), [len(args)], root.var.ty)
        new_bindings.append(relax.VarBinding(version[i], value))
    func = mod["main"]
    body = relax.SeqExpr([relax.DataflowBlock(new_bindings)], func.body.body)
    new_mod = builder.get()
    new_mod["main"] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    return relax.transform.DeadCodeElimination(["main"])(new_mod)


def _rewrite(mod: tvm.IRModule) -> tvm.IRModule:
    main = _Main.of(mod)
    roots = _roots(main, _concatenations(main))
    return _emit(main, roots) if roots else mod


def ConcatInPlace() -> tvm.transform.Pass:  # noqa: N802
    """Let the kernels that feed a concatenation write into its output, removing the copy kernel."""

    @tvm.transform.module_pass(opt_level=0, name="cosched.ConcatInPlace")
    def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return _rewrite(mod)

    return apply
