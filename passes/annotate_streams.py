"""AnnotateStreams: give every kernel call a stream, its order on it and the minimal cross-stream waits."""

from __future__ import annotations

import os

import tvm
from tvm import relax

from cosched.errors import CoschedError
from cosched.schedule import Kernel, Schedule, assign_waits

from .graph import (
    ATTR_CORES,
    ATTR_NUM_STREAMS,
    ATTR_POLICY,
    ATTR_SCHEDULE,
    ATTR_STRATEGY,
    ATTR_STREAM_THREADS,
    CALL_KERNEL,
    CALL_ORDER,
    CALL_STREAM,
    CALL_TENANT,
    CALL_WAITS,
    BindingGraph,
    binding_graph,
    call_attrs,
    kernel_ids,
    rebuild_main,
    replace_main,
    with_call_attrs,
)

POLICIES = ("auto", "tenant", "balanced", "round_robin")


def kernel_cost(mod: tvm.IRModule, call: relax.Call) -> float:
    """Estimated work of a kernel call (FLOPs, at least its output size) for load balancing."""
    from tvm.s_tir.analysis import estimate_tir_flops

    func = mod[call.args[0]]
    try:
        return max(float(estimate_tir_flops(func)), 1.0)
    except Exception:  # some kernels (e.g. pure data movement) have no estimate
        return 1.0


def assign_streams(graph: BindingGraph, num_streams: int, policy: str, mod: tvm.IRModule) -> dict[int, int]:
    """Node index of each kernel -> stream, following ``policy``."""
    kernels = graph.kernels
    if policy == "auto":
        policy = "tenant" if num_streams <= len(graph.tenants) else "balanced"
    if policy == "tenant":
        return {n.index: n.tenant % num_streams for n in kernels}
    if policy == "round_robin":
        return {n.index: i % num_streams for i, n in enumerate(kernels)}
    if policy != "balanced":
        raise CoschedError(f"unknown stream policy {policy!r}", hint=f"use one of {POLICIES}")
    # List scheduling on estimated costs: each kernel (in issue order) goes to the stream where it can
    # finish first; ties go to the stream of a producer, which saves a wait.
    deps = graph.kernel_deps()
    free = [0.0] * num_streams
    finish: dict[int, float] = {}
    stream_of: dict[int, int] = {}
    for node in kernels:
        cost = kernel_cost(mod, node.binding.value)
        ready = max((finish[d] for d in deps[node.index]), default=0.0)
        producer_streams = {stream_of[d] for d in deps[node.index]}
        best = min(range(num_streams), key=lambda s: (max(free[s], ready), s not in producer_streams, s))
        stream_of[node.index] = best
        finish[node.index] = max(free[best], ready) + cost
        free[best] = finish[node.index]
    return stream_of


def write_schedule(
    graph: BindingGraph, kernel_nodes: list, records: list[Kernel], threads: list[int], cores: int, policy: str
) -> relax.Function:
    """Main with kernels in the records' issue order, annotated with stream, order and waits.

    Call attrs carry the schedule for tools; bound names (``<tenant>_s<stream>_<order>``) and the
    ``cosched.schedule`` table on main show it to whoever prints the module.
    """
    from .interleave_operators import binding_order

    calls, renames, table = {}, {}, []
    for n, rec in zip(kernel_nodes, records, strict=True):
        call = n.binding.value
        attrs = {
            CALL_KERNEL: rec.id,
            CALL_TENANT: rec.tenant,
            CALL_STREAM: rec.stream,
            CALL_ORDER: rec.order,
            CALL_WAITS: rec.waits,
        }
        calls[n.index] = with_call_attrs(call, attrs)
        renames[n.index] = f"{rec.tenant}_s{rec.stream}_{rec.order}"
        waits = ", ".join(f"k{w}" for w in rec.waits)
        table.append(
            f"k{rec.id} {renames[n.index]} = {call.args[0].name_hint}: tenant={rec.tenant} "
            f"stream={rec.stream} order={rec.order} waits=[{waits}]"
        )
    order = binding_order(graph, [n.index for n in kernel_nodes])
    return rebuild_main(graph, order, renames, calls).with_attrs(
        {
            ATTR_NUM_STREAMS: len(threads),
            ATTR_STREAM_THREADS: list(threads),
            ATTR_CORES: cores,
            ATTR_POLICY: policy,
            ATTR_SCHEDULE: table,
        }
    )


@tvm.transform.module_pass(opt_level=0, name="AnnotateStreams")
class AnnotateStreams:
    """Annotate each kernel call with its stream, order and minimal waits; record the schedule on main."""

    def __init__(self, num_streams: int | None = None, policy: str = "auto", cores: int | None = None):
        if num_streams is not None and num_streams < 1:
            raise CoschedError(f"num_streams must be >= 1, got {num_streams}", hint="use 1 for one stream")
        if policy not in POLICIES:
            raise CoschedError(f"unknown stream policy {policy!r}", hint=f"use one of {POLICIES}")
        self.num_streams = num_streams
        self.policy = policy
        self.cores = cores

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        graph = binding_graph(mod)
        cores = self.cores or os.cpu_count() or 1
        # One stream per tenant needs no waits; the runtime shares the cores between busy streams.
        num_streams = self.num_streams or len(graph.tenants)
        stream_of = assign_streams(graph, num_streams, self.policy, mod)
        kernel_nodes = graph.kernels  # block order = issue order
        kid = kernel_ids(graph)
        counters = [0] * num_streams
        records = []
        for n in kernel_nodes:
            s = stream_of[n.index]
            records.append(
                Kernel(
                    id=kid[n.index],
                    func="",
                    tenant=graph.tenants[n.tenant],
                    args=[],
                    num_outputs=0,
                    stream=s,
                    order=counters[s],
                )
            )
            counters[s] += 1
        deps = {kid[i]: [kid[d] for d in ds] for i, ds in graph.kernel_deps().items()}
        assign_waits(records, deps, num_streams)

        # Every stream may use the whole budget: the runtime shares cores work-conservingly.
        func = write_schedule(graph, kernel_nodes, records, [cores] * num_streams, cores, self.policy)
        return replace_main(mod, func)


@tvm.transform.module_pass(opt_level=0, name="ApplySchedule")
class ApplySchedule:
    """Write a schedule IR (e.g. from search) back into an annotated module: order, streams and waits."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        graph = binding_graph(mod)
        by_kernel = {}
        for n in graph.kernels:
            attrs = call_attrs(n.binding.value)
            if CALL_KERNEL not in attrs:
                raise CoschedError("ApplySchedule needs a module annotated by AnnotateStreams", hint="run it first")
            by_kernel[int(attrs[CALL_KERNEL])] = n
        # Ids alone would accept a schedule made for other kernels (e.g. before retuning), so names count too.
        want = {k.id: k.func for k in self.schedule.kernels}
        have = {i: str(n.binding.value.args[0].name_hint) for i, n in by_kernel.items()}
        if want != have:
            raise CoschedError("the schedule's kernels do not match the module's", hint="search on this module")
        nodes = [by_kernel[k.id] for k in self.schedule.kernels]
        threads = [s.threads for s in self.schedule.streams]
        func = write_schedule(
            graph, nodes, list(self.schedule.kernels), threads, self.schedule.cores, self.schedule.policy
        )
        return replace_main(mod, func.with_attr(ATTR_STRATEGY, self.schedule.strategy))
