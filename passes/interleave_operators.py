"""InterleaveOperators: reorder main's kernels across tenants, respecting data dependencies."""

from __future__ import annotations

from collections.abc import Sequence

import tvm

from cosched.errors import CoschedError

from .graph import (
    ATTR_STRATEGY,
    CALL_KERNEL,
    CALL_TENANT,
    BindingGraph,
    binding_graph,
    kernel_ids,
    rebuild_main,
    replace_main,
    with_call_attrs,
)

STRATEGIES = ("sequential", "round_robin", "breadth_first", "explicit")


def _per_tenant(graph: BindingGraph) -> list[list[int]]:
    """Each tenant's kernels in the order of its own program (a topological order)."""
    lists: list[list[int]] = [[] for _ in graph.tenants]
    for node in graph.kernels:
        lists[node.tenant].append(node.index)
    return lists


def _sequential(graph: BindingGraph) -> list[int]:
    return [i for kernels in _per_tenant(graph) for i in kernels]


def _round_robin(graph: BindingGraph) -> list[int]:
    # Tenants are independent, so zipping their own topological orders is a topological order.
    lists = _per_tenant(graph)
    return [lst[j] for j in range(max(map(len, lists), default=0)) for lst in lists if j < len(lst)]


def _breadth_first(graph: BindingGraph) -> list[int]:
    """Kernels level by level (longest path from the inputs); within a level, tenants take turns."""
    deps = graph.kernel_deps()
    level: dict[int, int] = {}
    for node in graph.kernels:
        level[node.index] = 1 + max((level[d] for d in deps[node.index]), default=-1)
    rank: dict[tuple[int, int], int] = {}
    key = {}
    for node in graph.kernels:
        slot = (level[node.index], node.tenant)
        rank[slot] = rank.get(slot, -1) + 1
        key[node.index] = (level[node.index], rank[slot], node.tenant, node.index)
    return sorted(key, key=key.__getitem__)


def _explicit(graph: BindingGraph, order: Sequence[str | int]) -> list[int]:
    """``order`` names kernels as ``"tenant:k"`` (k-th kernel of that tenant) or as sequential positions."""
    lists = _per_tenant(graph)
    flat = _sequential(graph)
    result = []
    for item in order:
        if isinstance(item, str) and ":" in item:
            name, k = item.rsplit(":", 1)
            if name not in graph.tenants:
                raise CoschedError(
                    f"explicit order names unknown tenant in {item!r}", tenant=name, hint=f"tenants are {graph.tenants}"
                )
            kernels = lists[graph.tenants.index(name)]
            if not k.isdigit() or int(k) >= len(kernels):
                raise CoschedError(
                    f"explicit order item {item!r} is out of range",
                    tenant=name,
                    hint=f"this tenant has kernels 0..{len(kernels) - 1}",
                )
            result.append(kernels[int(k)])
        else:
            if not 0 <= int(item) < len(flat):
                raise CoschedError(f"explicit order item {item!r} is out of range", hint=f"use 0..{len(flat) - 1}")
            result.append(flat[int(item)])
    if sorted(result) != sorted(flat):
        raise CoschedError(
            f"explicit order must name each of the {len(flat)} kernels exactly once (got {len(result)} items, "
            f"{len(set(result))} distinct)",
            hint="list every kernel as 'tenant:k'",
        )
    deps = graph.kernel_deps()
    seen: set[int] = set()
    for i in result:
        late = [d for d in deps[i] if d not in seen]
        if late:
            node = graph.nodes[i]
            raise CoschedError(
                f"explicit order puts {node.binding.var.name} before the kernels it reads",
                tenant=graph.tenants[node.tenant],
                hint="the order must respect data dependencies",
            )
        seen.add(i)
    return result


def kernel_order(graph: BindingGraph, strategy: str, order: Sequence[str | int] | None = None) -> list[int]:
    """Node indices of the kernels in the order ``strategy`` issues them."""
    if strategy == "explicit" or order is not None:
        if order is None:
            raise CoschedError("strategy 'explicit' needs order=[...]", hint="list kernels as 'tenant:k'")
        return _explicit(graph, order)
    table = {"sequential": _sequential, "round_robin": _round_robin, "breadth_first": _breadth_first}
    if strategy not in table:
        raise CoschedError(f"unknown interleaving strategy {strategy!r}", hint=f"use one of {STRATEGIES}")
    return table[strategy](graph)


def binding_order(graph: BindingGraph, kernels: list[int]) -> list[int]:
    """All bindings: kernels in the given order, each alias binding as soon as what it reads exists."""
    emitted: set[int] = set()
    order: list[int] = []

    def emit(i: int) -> None:
        if i in emitted:
            return
        for d in graph.nodes[i].deps:
            emit(d)
        emitted.add(i)
        order.append(i)

    for i in kernels:
        emit(i)
    for node in graph.nodes:
        emit(node.index)
    return order


@tvm.transform.module_pass(opt_level=0, name="InterleaveOperators")
class InterleaveOperators:
    """Reorder main's kernels across tenants by a strategy or an explicit order."""

    def __init__(self, strategy: str = "breadth_first", order: Sequence[str | int] | None = None):
        self.strategy = "explicit" if order is not None else strategy
        self.order = list(order) if order is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        graph = binding_graph(mod)
        kernels = kernel_order(graph, self.strategy, self.order)
        ids = kernel_ids(graph)
        calls = {
            n.index: with_call_attrs(n.binding.value, {CALL_KERNEL: ids[n.index], CALL_TENANT: graph.tenants[n.tenant]})
            for n in graph.kernels
        }
        func = rebuild_main(graph, binding_order(graph, kernels), calls=calls).with_attr(ATTR_STRATEGY, self.strategy)
        return replace_main(mod, func)
