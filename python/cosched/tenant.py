"""Tenants: the models that share one bundle, loaded from ONNX or given as Relax modules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import tvm
from tvm import relax

from .errors import CoschedError


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Tenant:
    """One model of a bundle: its Relax module (entry ``main``) and its data inputs and outputs."""

    name: str
    mod: tvm.IRModule
    inputs: list[TensorSpec]
    outputs: list[str] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]


_NAME_RE = re.compile(r"[^0-9A-Za-z_]")


def _sanitize(name: str) -> str:
    """A tenant name usable as a Relax function name."""
    name = _NAME_RE.sub("_", name)
    return name if name and not name[0].isdigit() else f"t_{name}"


def _read_onnx(model: str | Path | bytes | onnx.ModelProto, name: str | None) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, name or (model.graph.name or "model")
    if isinstance(model, (bytes, bytearray)):
        label = name or "model"
        try:
            return onnx.ModelProto.FromString(bytes(model)), label
        except Exception as err:
            raise CoschedError(
                f"bytes are not an ONNX model: {err}", tenant=label, hint="pass the bytes of a .onnx file"
            ) from None
    path = Path(model)
    label = name or path.stem
    if not path.exists():
        raise CoschedError(f"no such file: {path}", tenant=label, hint="check the path to the .onnx file")
    try:
        proto = onnx.load(str(path))
    except Exception as err:
        raise CoschedError(
            f"{path} is not a valid ONNX file ({type(err).__name__}: {err})",
            tenant=label,
            hint="re-export the model to ONNX",
        ) from None
    return proto, label


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    return dims


def load_onnx(
    model: str | Path | bytes | onnx.ModelProto,
    name: str | None = None,
    shapes: dict[str, tuple[int, ...] | list[int]] | None = None,
) -> Tenant:
    """Load an ONNX model (a path, bytes or a ``ModelProto``) as a tenant.

    ``shapes`` fixes the shape of inputs whose dimensions are symbolic (e.g. the batch size).
    """
    proto, label = _read_onnx(model, name)
    label = _sanitize(label)
    graph = proto.graph
    if not graph.node:
        raise CoschedError("the ONNX graph has no nodes", tenant=label, hint="pass a complete model")
    try:
        onnx.checker.check_model(proto)
    except Exception as err:
        raise CoschedError(
            f"the ONNX model is invalid: {str(err).splitlines()[0]}", tenant=label, hint="fix or re-export the model"
        ) from None
    shapes = {k: tuple(int(x) for x in v) for k, v in (shapes or {}).items()}
    # Older exporters list initializers as graph inputs: only the rest are data inputs.
    initializers = {init.name for init in graph.initializer}
    data_inputs = [i for i in graph.input if i.name not in initializers]
    unknown = set(shapes) - {i.name for i in data_inputs}
    if unknown:
        raise CoschedError(
            f"shapes given for unknown inputs {sorted(unknown)}",
            tenant=label,
            hint=f"the data inputs are {[i.name for i in data_inputs]}",
        )
    specs: list[TensorSpec] = []
    for vi in data_inputs:
        elem = vi.type.tensor_type.elem_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else "float32"
        if vi.name in shapes:
            shape = shapes[vi.name]
        else:
            dims = _dims(vi)
            if any(not isinstance(d, int) or d <= 0 for d in dims):
                raise CoschedError(
                    f"input {vi.name!r} has symbolic shape {dims}",
                    tenant=label,
                    hint=f"pass shapes={{{vi.name!r}: (...)}} with concrete sizes",
                )
            shape = tuple(int(d) for d in dims)
        specs.append(TensorSpec(vi.name, tuple(shape), dtype))
    try:
        from tvm.relax.frontend.onnx import from_onnx

        mod = from_onnx(
            proto,
            shape_dict={s.name: list(s.shape) for s in specs},
            dtype_dict={s.name: s.dtype for s in specs},
        )
    except Exception as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CoschedError(
            f"TVM cannot import this ONNX model: {first}",
            tenant=label,
            hint="check the opset and operators are supported by tvm.relax.frontend.onnx",
        ) from None
    return Tenant(name=label, mod=mod, inputs=specs, outputs=[o.name for o in graph.output])


def from_relax(mod: tvm.IRModule, name: str, input_names: list[str] | None = None) -> Tenant:
    """Use a Relax IRModule (entry ``main``, static shapes) as a tenant."""
    label = _sanitize(name)
    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise CoschedError("the IRModule has no 'main' function", tenant=label, hint="name the entry function main")
    main = mod["main"]
    if not isinstance(main, relax.Function):
        raise CoschedError("'main' is not a Relax function", tenant=label, hint="pass a Relax IRModule")
    from cosched.passes.graph import static_shape  # cosched.passes imports this module

    specs = []
    for i, param in enumerate(main.params):
        ty = param.ty
        if (dims := static_shape(ty)) is None:
            raise CoschedError(
                f"parameter {param.name} is not a tensor of static shape",
                tenant=label,
                hint="give every input of main a concrete tensor shape (bind symbolic ones first)",
            )
        shape = tuple(dims)
        pname = input_names[i] if input_names else param.name
        specs.append(TensorSpec(pname, shape, str(ty.dtype)))
    return Tenant(name=label, mod=mod, inputs=specs, outputs=[])


def check_unique_names(tenants) -> None:
    """Tenant names key inputs, outputs and kernels: two tenants may not share one."""
    names = [t.name for t in tenants]
    for name in names:
        if names.count(name) > 1:
            raise CoschedError("two tenants have this name", tenant=name, hint="pass a distinct name= to load_onnx")


def as_tenant(obj: Tenant | tvm.IRModule | str | Path | bytes | onnx.ModelProto, index: int) -> Tenant:
    """Turn anything the API accepts into a tenant."""
    if isinstance(obj, Tenant):
        return obj
    if isinstance(obj, tvm.IRModule):
        return from_relax(obj, f"tenant{index}")
    return load_onnx(obj)
