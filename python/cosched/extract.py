"""Reading the schedule IR and the params out of an annotated module."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from cosched.passes.graph import (
    ATTR_CORES,
    ATTR_INPUT_NAMES,
    ATTR_NUM_STREAMS,
    ATTR_OUTPUT_TENANTS,
    ATTR_PARAM_TENANTS,
    ATTR_POLICY,
    ATTR_STRATEGY,
    ATTR_STREAM_THREADS,
    ATTR_TENANTS,
    CALL_KERNEL,
    CALL_ORDER,
    CALL_STREAM,
    CALL_TENANT,
    CALL_WAITS,
    is_kernel_call,
    main_block,
)

from .errors import CoschedError
from .schedule import Buffer, Kernel, Schedule, Stream, TenantIO


def _tensor_types(ty) -> list[relax.TensorType]:
    if isinstance(ty, relax.TupleType):
        return [t for f in ty.fields for t in _tensor_types(f)]
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise CoschedError(f"cannot schedule a value of type {ty}", hint="only static tensor shapes are supported")
    return [ty]


def _shape(ty: relax.TensorType) -> list[int]:
    try:
        return [int(d) for d in ty.shape.values]
    except TypeError:
        raise CoschedError(f"symbolic shape {ty.shape}", hint="give every input a concrete shape") from None


def extract_schedule(mod: tvm.IRModule) -> tuple[Schedule, dict[int, np.ndarray]]:
    """The schedule IR of an annotated module, and the params (constants) keyed by buffer id."""
    func = mod["main"]
    attrs = func.attrs
    if attrs is None or ATTR_NUM_STREAMS not in attrs:
        raise CoschedError("main has no stream annotations", hint="run cosched.passes.AnnotateStreams() last")
    tenants = [str(t) for t in attrs[ATTR_TENANTS]]
    buffers: list[Buffer] = []
    params: dict[int, np.ndarray] = {}
    values: dict[relax.Var, list[int]] = {}
    const_ids: dict[tvm.ir.GenericConst, int] = {}

    def new_buffer(ty: relax.TensorType, kind: str, tenant: str | None, name: str) -> int:
        buffers.append(Buffer(len(buffers), _shape(ty), str(ty.dtype), kind, tenant, name))
        return len(buffers) - 1

    def resolve(expr: relax.Expr, tenant: str | None) -> list[int]:
        if isinstance(expr, relax.Var):
            return values[expr]
        if isinstance(expr, tvm.ir.GenericConst):
            if expr not in const_ids:
                bid = new_buffer(expr.ty, "param", tenant, f"const{len(const_ids)}")
                const_ids[expr] = bid
                params[bid] = expr.value.numpy()
            return [const_ids[expr]]
        if isinstance(expr, relax.Tuple):
            return [b for f in expr.fields for b in resolve(f, tenant)]
        if isinstance(expr, relax.TupleGetItem):
            return [resolve(expr.tuple_value, tenant)[expr.index]]
        raise CoschedError(f"unsupported expression {type(expr).__name__} in main", hint="lower the module first")

    tenant_io = [TenantIO(name=t, inputs={}, outputs=[]) for t in tenants]
    for param, owner, name in zip(func.params, attrs[ATTR_PARAM_TENANTS], attrs[ATTR_INPUT_NAMES], strict=True):
        tenant = tenants[int(owner)]
        bid = new_buffer(param.ty, "input", tenant, str(name))
        values[param] = [bid]
        tenant_io[int(owner)].inputs[str(name)] = bid

    kernels: list[Kernel] = []
    for binding in main_block(func).bindings:
        value = binding.value
        if not is_kernel_call(value):
            values[binding.var] = resolve(value, None)
            continue
        cattrs = value.attrs
        if cattrs is None or CALL_STREAM not in cattrs:
            raise CoschedError(f"kernel call {binding.var.name} has no stream", hint="run AnnotateStreams() last")
        tenant = str(cattrs[CALL_TENANT])
        args = resolve(value.args[1], tenant)
        outs = [new_buffer(t, "intermediate", tenant, binding.var.name) for t in _tensor_types(binding.var.ty)]
        values[binding.var] = outs
        kernels.append(
            Kernel(
                id=int(cattrs[CALL_KERNEL]),
                func=value.args[0].name_hint,
                tenant=tenant,
                args=args + outs,
                num_outputs=len(outs),
                stream=int(cattrs[CALL_STREAM]),
                order=int(cattrs[CALL_ORDER]),
                waits=[int(w) for w in cattrs[CALL_WAITS]],
            )
        )
    outputs = resolve(func.body.body, None)
    for bid, owner in zip(outputs, attrs[ATTR_OUTPUT_TENANTS], strict=True):
        if buffers[bid].kind == "intermediate":
            buffers[bid].kind = "output"
        tenant_io[int(owner)].outputs.append(bid)
    streams = [Stream(i, int(t)) for i, t in enumerate(attrs[ATTR_STREAM_THREADS])]
    schedule = Schedule(
        kernels=kernels,
        buffers=buffers,
        tenants=tenant_io,
        streams=streams,
        strategy=str(attrs.get(ATTR_STRATEGY, "")) if ATTR_STRATEGY in attrs else "",
        policy=str(attrs[ATTR_POLICY]),
        cores=int(attrs[ATTR_CORES]),
    )
    return schedule, params
