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
    ATTR_SLICE_BYTES,
    ATTR_STRATEGY,
    ATTR_STREAM_THREADS,
    ATTR_TENANTS,
    CALL_KERNEL,
    CALL_ORDER,
    CALL_STREAM,
    CALL_TENANT,
    CALL_WAITS,
    INPLACE_INDICES,
    call_attrs,
    is_kernel_call,
    main_block,
    static_shape,
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
    if (shape := static_shape(ty)) is None:
        raise CoschedError(f"symbolic shape {ty.shape}", hint="give every input a concrete shape")
    return shape


def _slice_bytes(kernel) -> dict[int, int]:
    if not isinstance(kernel, tvm.tirx.PrimFunc) or kernel.attrs is None or ATTR_SLICE_BYTES not in kernel.attrs:
        return {}
    return {int(i): int(n) for i, n in kernel.attrs[ATTR_SLICE_BYTES].items()}


def extract_schedule(mod: tvm.IRModule) -> tuple[Schedule, dict[int, np.ndarray]]:
    """The schedule IR of an annotated module, and the params (constants) keyed by buffer id.

    Buffers are numbered canonically (inputs, then each kernel's constants and outputs by stable
    kernel id), not by issue order, so every schedule of one module shares buffer ids and params.
    """
    func = mod["main"]
    attrs = func.attrs
    if attrs is None or ATTR_NUM_STREAMS not in attrs:
        raise CoschedError("main has no stream annotations", hint="run cosched.passes.AnnotateStreams() last")
    tenants = [str(t) for t in attrs[ATTR_TENANTS]]

    # Pass 1, in binding order: what each variable holds, symbolically.
    values: dict[relax.Var, list[tuple]] = {}
    for i, param in enumerate(func.params):
        values[param] = [("in", i)]

    def symbolic(expr: relax.Expr) -> list[tuple]:
        if isinstance(expr, relax.Var):
            return values[expr]
        if isinstance(expr, tvm.ir.GenericConst):
            return [("const", expr)]
        if isinstance(expr, relax.Tuple):
            return [v for f in expr.fields for v in symbolic(f)]
        if isinstance(expr, relax.TupleGetItem):
            return [symbolic(expr.tuple_value)[expr.index]]
        raise CoschedError(f"unsupported expression {type(expr).__name__} in main", hint="lower the module first")

    calls = []  # (kernel id, call, inputs, outputs, output types, bound name) in issue order
    for binding in main_block(func).bindings:
        value = binding.value
        if not is_kernel_call(value):
            values[binding.var] = symbolic(value)
            continue
        cattrs = call_attrs(value)
        if CALL_STREAM not in cattrs:
            raise CoschedError(f"kernel call {binding.var.name} has no stream", hint="run AnnotateStreams() last")
        kid = int(cattrs[CALL_KERNEL])
        out_types = _tensor_types(binding.var.ty)
        args = symbolic(value.args[1])
        inplace = [int(i) for i in cattrs.get(INPLACE_INDICES, [])]
        if inplace:
            # An in-place kernel's outputs are its last arguments, updated: no buffers of their own.
            updated = args[len(args) - len(inplace) :]
            if (
                inplace != list(range(len(args) - len(inplace), len(args)))
                or len(inplace) != len(out_types)
                or any(a[0] != "out" for a in updated)
            ):
                raise CoschedError(
                    f"kernel call {binding.var.name} updates arguments {inplace} in place",
                    hint="cosched runs in-place kernels that update other kernels' results, passed last",
                )
            values[binding.var] = updated
            args = args[: len(args) - len(inplace)]
        else:
            values[binding.var] = [("out", kid, j) for j in range(len(out_types))]
        calls.append((kid, value, args, values[binding.var], out_types, binding.var.name))

    # Pass 2: number buffers canonically.
    buffers: list[Buffer] = []
    params: dict[int, np.ndarray] = {}
    ids: dict = {}

    def new_buffer(key, ty: relax.TensorType, kind: str, tenant: str | None, name: str) -> None:
        ids[key] = len(buffers)
        buffers.append(Buffer(len(buffers), _shape(ty), str(ty.dtype), kind, tenant, name))

    tenant_io = [TenantIO(name=t, inputs={}, outputs=[]) for t in tenants]
    for i, (param, owner, name) in enumerate(
        zip(func.params, attrs[ATTR_PARAM_TENANTS], attrs[ATTR_INPUT_NAMES], strict=True)
    ):
        new_buffer(("in", i), param.ty, "input", tenants[int(owner)], str(name))
        tenant_io[int(owner)].inputs[str(name)] = ids[("in", i)]
    for _kid, call, args, outs, out_types, name in sorted(calls, key=lambda c: c[0]):
        tenant = str(call.attrs[CALL_TENANT])
        for arg in args:
            if arg[0] == "const" and arg not in ids:
                new_buffer(arg, arg[1].ty, "param", tenant, f"const{len(params)}")
                params[ids[arg]] = arg[1].value.numpy()
        for out, ty in zip(outs, out_types, strict=True):
            if out not in ids:
                new_buffer(out, ty, "intermediate", tenant, name)

    kernels = [
        Kernel(
            id=kid,
            func=call.args[0].name_hint,
            tenant=str(call.attrs[CALL_TENANT]),
            args=[ids[a] for a in args + outs],
            num_outputs=len(outs),
            stream=int(call.attrs[CALL_STREAM]),
            order=int(call.attrs[CALL_ORDER]),
            waits=[int(w) for w in call.attrs[CALL_WAITS]],
            slice_bytes=_slice_bytes(mod[call.args[0]]),
        )
        for kid, call, args, outs, _, _ in calls
    ]
    outputs = [ids[v] for v in symbolic(func.body.body)]
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
        strategy=str(attrs[ATTR_STRATEGY]) if ATTR_STRATEGY in attrs else "",
        policy=str(attrs[ATTR_POLICY]),
        cores=int(attrs[ATTR_CORES]),
    )
    return schedule, params
