"""The binding graph of a merged, lowered ``main``: kernels, their tenants and dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax

from cosched.errors import CoschedError

# Function attributes MergeTenants writes on main; function attrs survive lowering, call attrs may not.
ATTR_TENANTS = "cosched.tenants"
ATTR_PARAM_TENANTS = "cosched.param_tenants"
ATTR_INPUT_NAMES = "cosched.input_names"
ATTR_OUTPUT_TENANTS = "cosched.output_tenants"
ATTR_STRATEGY = "cosched.strategy"
ATTR_NUM_STREAMS = "cosched.num_streams"
ATTR_STREAM_THREADS = "cosched.stream_threads"
ATTR_CORES = "cosched.cores"
ATTR_POLICY = "cosched.policy"
ATTR_SCHEDULE = "cosched.schedule"
# Call attributes AnnotateStreams writes on each kernel call.
CALL_KERNEL = "cosched.kernel"
CALL_TENANT = "cosched.tenant"
CALL_STREAM = "cosched.stream"
CALL_ORDER = "cosched.order"
CALL_WAITS = "cosched.waits"
INPLACE_INDICES = "inplace_indices"
# Kernel (PrimFunc) attribute ConcatInPlace writes: parameter index -> bytes of the slice it touches.
ATTR_SLICE_BYTES = "cosched.slice_bytes"

CALL_TIR = tvm.ir.Op.get("relax.call_tir")
CALL_TIR_INPLACE = tvm.ir.Op.get("relax.call_tir_inplace")


def static_shape(ty: relax.Type) -> list[int] | None:
    """The dimensions of a tensor type with a concrete shape; None for any other type."""
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape.values]
    except TypeError:  # a symbolic dimension
        return None


@dataclass
class Node:
    """One binding of main's dataflow block."""

    index: int
    binding: relax.VarBinding
    is_kernel: bool
    tenant: int = -1
    deps: list[int] = field(default_factory=list)  # node indices read directly


@dataclass
class BindingGraph:
    """Main's bindings with tenants and dependencies; ``kernels`` lists the kernel nodes in block order."""

    func: relax.Function
    tenants: list[str]
    nodes: list[Node]

    @property
    def kernels(self) -> list[Node]:
        return [n for n in self.nodes if n.is_kernel]

    def kernel_deps(self) -> dict[int, list[int]]:
        """Node index of each kernel -> node indices of the kernels it depends on (through aliases)."""
        memo: dict[int, set[int]] = {}

        def producers(i: int) -> set[int]:
            if i not in memo:
                node = self.nodes[i]
                memo[i] = {i} if node.is_kernel else set().union(*(producers(d) for d in node.deps))
            return memo[i]

        return {n.index: sorted(set().union(*(producers(d) for d in n.deps))) for n in self.kernels}


def kernel_ids(graph: BindingGraph) -> dict[int, int]:
    """Node index -> stable kernel id: the id a scheduling pass gave it, else its position in the block.

    Ids survive re-interleaving, so every schedule of one module numbers kernels and buffers alike.
    """
    kernels = graph.kernels
    given = [call_attrs(n.binding.value) for n in kernels]
    if all(CALL_KERNEL in a for a in given):
        return {n.index: int(a[CALL_KERNEL]) for n, a in zip(kernels, given, strict=True)}
    return {n.index: i for i, n in enumerate(kernels)}


def call_attrs(call: relax.Call) -> dict:
    """A kernel call's attributes as a dict; an in-place call's own ones under ``inplace_indices``."""
    attrs = call.attrs
    if attrs is None:
        return {}
    if isinstance(attrs, tvm.ir.attrs.DictAttrs):
        return dict(attrs.items())
    return {INPLACE_INDICES: [int(i) for i in attrs.inplace_indices]}


def with_call_attrs(call: relax.Call, attrs: dict) -> relax.Call:
    """The call with ``attrs`` merged into its attributes."""
    # An in-place call keeps its indices among the merged attributes: TVM's printer then shows
    # none, but cosched reads them back with call_attrs.
    merged = call_attrs(call)
    merged.update(attrs)
    return relax.Call(call.op, call.args, tvm.ir.attrs.DictAttrs(merged), call.ty_args, call.span)


def is_kernel_call(value: relax.Expr) -> bool:
    return isinstance(value, relax.Call) and (value.op.same_as(CALL_TIR) or value.op.same_as(CALL_TIR_INPLACE))


def _vars_in(expr: relax.Expr) -> list[relax.Var]:
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Tuple):
        return [v for f in expr.fields for v in _vars_in(f)]
    if isinstance(expr, relax.TupleGetItem):
        return _vars_in(expr.tuple_value)
    if isinstance(expr, relax.Call):
        args = expr.args[1:] if is_kernel_call(expr) else expr.args
        return [v for a in args for v in _vars_in(a)]
    return []


def main_block(func: relax.Function) -> relax.DataflowBlock:
    body = func.body
    if not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1:
        raise CoschedError(
            "main must be lowered to a single dataflow block before scheduling",
            hint="run MergeTenants and LowerKernels first",
        )
    return body.blocks[0]


def binding_graph(mod: tvm.IRModule) -> BindingGraph:
    """Analyse main of a merged module; each binding's tenant comes from the parameters it reads."""
    func = mod["main"]
    attrs = func.attrs
    if attrs is None or ATTR_TENANTS not in attrs:
        raise CoschedError("main carries no tenant ownership", hint="run cosched.passes.MergeTenants() first")
    tenants = [str(t) for t in attrs[ATTR_TENANTS]]
    param_tenant = {p: int(t) for p, t in zip(func.params, attrs[ATTR_PARAM_TENANTS], strict=True)}
    block = main_block(func)
    index_of: dict[relax.Var, int] = {}
    nodes: list[Node] = []
    for i, binding in enumerate(block.bindings):
        if not isinstance(binding, relax.VarBinding):
            raise CoschedError(f"unsupported binding {type(binding).__name__} in main", hint="lower the module first")
        value = binding.value
        kernel = is_kernel_call(value)
        if not kernel and not isinstance(value, (relax.Tuple, relax.TupleGetItem, relax.Var, tvm.ir.GenericConst)):
            op = getattr(value, "op", value)
            raise CoschedError(
                f"main still calls {op} after lowering; cosched runs only TIR kernels",
                hint="make sure LegalizeOps can lower every operator of the model",
            )
        used = _vars_in(value)
        deps = sorted({index_of[v] for v in used if v in index_of})
        owners = {param_tenant[v] for v in used if v in param_tenant} | {nodes[d].tenant for d in deps}
        owners.discard(-1)
        if len(owners) > 1 and kernel:
            raise CoschedError(
                f"kernel {binding.var.name} reads tensors of several tenants", hint="tenants must be independent"
            )
        # The output tuple gathers all tenants: it belongs to none (-1).
        nodes.append(Node(i, binding, kernel, owners.pop() if len(owners) == 1 else -1, deps))
        index_of[binding.var] = i
    # Bindings fed only by constants belong to the tenant that consumes them.
    for node in reversed(nodes):
        if node.tenant < 0 and node.is_kernel:
            users = [n.tenant for n in nodes if node.index in n.deps and n.tenant >= 0]
            node.tenant = users[0] if users else 0
    return BindingGraph(func, tenants, nodes)


def rebuild_main(
    graph: BindingGraph,
    order: list[int],
    renames: dict[int, str] | None = None,
    calls: dict[int, relax.Call] | None = None,
) -> relax.Function:
    """Main with its bindings in ``order`` (node indices), optionally renamed and with new kernel calls."""
    func = graph.func
    renames = renames or {}
    calls = calls or {}
    var_map: dict[relax.Var, relax.Var] = {}
    bindings = []
    for i in order:
        node = graph.nodes[i]
        old = node.binding.var
        value = calls.get(i, node.binding.value)
        if i in renames:
            new = (
                relax.DataflowVar(renames[i], old.ty)
                if isinstance(old, relax.DataflowVar)
                else relax.Var(renames[i], old.ty)
            )
            var_map[old] = new
        bindings.append((node.binding.var, value))
    new_bindings = [relax.VarBinding(var_map.get(v, v), substitute_vars(value, var_map)) for v, value in bindings]
    body = relax.SeqExpr([relax.DataflowBlock(new_bindings)], substitute_vars(func.body.body, var_map))
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)


def substitute_vars(expr: relax.Expr, var_map: dict[relax.Var, relax.Var]) -> relax.Expr:
    """``expr`` with variables replaced as ``var_map`` says (bindings, tuples and calls)."""
    if not var_map:
        return expr
    if isinstance(expr, relax.Var):
        return var_map.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([substitute_vars(f, var_map) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(substitute_vars(expr.tuple_value, var_map), expr.index)
    if isinstance(expr, relax.Call):
        return relax.Call(
            expr.op, [substitute_vars(a, var_map) for a in expr.args], expr.attrs, expr.ty_args, expr.span
        )
    return expr


def replace_main(mod: tvm.IRModule, func: relax.Function) -> tvm.IRModule:
    """A copy of ``mod`` with a new main (passes must not mutate their input module)."""
    functions = {gv: (func if gv.name_hint == "main" else f) for gv, f in mod.functions.items()}
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)
