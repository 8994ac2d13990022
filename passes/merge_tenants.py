"""MergeTenants: one ``main`` that computes every tenant's outputs."""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import relax

from cosched.errors import CoschedError
from cosched.tenant import Tenant, check_unique_names

from .graph import ATTR_INPUT_NAMES, ATTR_OUTPUT_TENANTS, ATTR_PARAM_TENANTS, ATTR_TENANTS

ATTR_TENANT = "cosched.tenant"


def stack_tenants(tenants: Sequence[Tenant]) -> tvm.IRModule:
    """Put each tenant's entry function into one module, named after the tenant, ready for MergeTenants."""
    check_unique_names(tenants)
    bb = relax.BlockBuilder()
    for index, tenant in enumerate(tenants):
        funcs = {gv.name_hint: f for gv, f in tenant.mod.functions.items()}
        if set(funcs) != {"main"} or not isinstance(funcs["main"], relax.Function):
            raise CoschedError(
                f"the module must hold exactly one Relax function 'main' (has {sorted(funcs)})",
                tenant=tenant.name,
                hint="pass the un-lowered module straight from the frontend",
            )
        func = funcs["main"].without_attr("global_symbol")
        func = func.with_attrs(
            {
                ATTR_TENANT: tenant.name,
                "cosched.tenant_index": index,
                ATTR_INPUT_NAMES: [s.name for s in tenant.inputs],
            }
        )
        bb.add_func(func, tenant.name)
    return bb.get()


def _tenant_functions(mod: tvm.IRModule) -> list[tuple[tvm.ir.GlobalVar, relax.Function]]:
    found = [
        (gv, f)
        for gv, f in mod.functions.items()
        if isinstance(f, relax.Function) and f.attrs is not None and ATTR_TENANT in f.attrs
    ]
    if not found:
        raise CoschedError("the module has no tenant functions", hint="build it with cosched.passes.stack_tenants")
    return sorted(found, key=lambda item: int(item[1].attrs["cosched.tenant_index"]))


@tvm.transform.module_pass(opt_level=0, name="MergeTenants")
class MergeTenants:
    """Merge the tenant functions into one ``main``, recording which tenant owns each input and output."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        tenant_funcs = _tenant_functions(mod)
        bb = relax.BlockBuilder(mod)
        params, param_tenants, input_names, output_tenants, names = [], [], [], [], []
        for index, (_, func) in enumerate(tenant_funcs):
            name = str(func.attrs[ATTR_TENANT])
            names.append(name)
            tenant_params = [relax.Var(f"{name}_{p.name}", p.ty) for p in func.params]
            params.extend(tenant_params)
            param_tenants.extend([index] * len(tenant_params))
            input_names.extend(str(n) for n in func.attrs[ATTR_INPUT_NAMES])
        with bb.function("main", params):
            with bb.dataflow():
                outputs, start = [], 0
                for index, (gv, func) in enumerate(tenant_funcs):
                    args = params[start : start + len(func.params)]
                    start += len(func.params)
                    result = bb.emit(relax.Call(gv, args))
                    if isinstance(result.ty, relax.TupleType):
                        for j in range(len(result.ty.fields)):
                            outputs.append(bb.emit(relax.TupleGetItem(result, j)))
                            output_tenants.append(index)
                    else:
                        outputs.append(result)
                        output_tenants.append(index)
                out = bb.emit_output(relax.Tuple(outputs))
            bb.emit_func_output(out)
        merged = bb.get()
        main_gv = merged.get_global_var("main")
        merged[main_gv] = merged[main_gv].with_attrs(
            {
                ATTR_TENANTS: names,
                ATTR_PARAM_TENANTS: param_tenants,
                ATTR_INPUT_NAMES: input_names,
                ATTR_OUTPUT_TENANTS: output_tenants,
                "num_input": len(params),
            }
        )
        merged = relax.transform.InlinePrivateFunctions()(merged)
        merged = relax.transform.DeadCodeElimination(["main"])(merged)
        for gv, _ in tenant_funcs:
            if gv.name_hint in [g.name_hint for g in merged.get_global_vars()]:
                del merged[gv.name_hint]
        return merged
