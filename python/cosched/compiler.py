"""cosched.compile: tenants -> one merged, lowered, co-scheduled module -> a runnable Bundle."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import onnx
import tvm
from tvm import tirx

from .errors import CoschedError
from .extract import extract_schedule
from .target import as_target
from .tenant import Tenant, as_tenant, check_unique_names


@cache
def _kernel_dir() -> Path:
    """Where compiled (not yet exported) kernel libraries live for this process."""
    path = Path(tempfile.mkdtemp(prefix="cosched-kernels-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def as_tenants(tenants: Sequence[Tenant | tvm.IRModule | str | Path | bytes | onnx.ModelProto]) -> list[Tenant]:
    """Tenants from what the API accepts; names must be distinct."""
    if isinstance(tenants, (Tenant, tvm.IRModule, str, Path, bytes, onnx.ModelProto)):
        tenants = [tenants]
    result = [as_tenant(t, i) for i, t in enumerate(tenants)]
    if not result:
        raise CoschedError("no tenants given", hint="pass a list of models")
    check_unique_names(result)
    return result


def lower_tenants(
    tenants: Sequence[Tenant],
    target: tvm.target.Target,
    database: str | Path | None = None,
    concat_in_place: bool | None = None,
) -> tvm.IRModule:
    """Merge the tenants into one main and lower it to (tuned) TIR kernels."""
    from cosched.passes import LowerKernels, MergeTenants, stack_tenants

    if database is not None:
        from .tuning_db import check_database

        check_database(database, target)
    seq = tvm.transform.Sequential(
        [MergeTenants(), LowerKernels(target, database, concat_in_place=concat_in_place)],
        name="cosched.Lower",
    )
    try:
        return seq(stack_tenants(tenants))
    except CoschedError:
        raise
    except Exception as err:
        raise CoschedError(
            f"lowering failed: {str(err).strip().splitlines()[-1]}",
            hint="check the models' operators are supported by TVM's Relax legalization",
        ) from None


def schedule_module(
    mod: tvm.IRModule,
    strategy: str = "breadth_first",
    num_streams: int | None = None,
    policy: str = "auto",
    cores: int | None = None,
    order: Sequence[str | int] | None = None,
) -> tvm.IRModule:
    """Interleave and annotate a lowered merged module."""
    from cosched.passes import AnnotateStreams, InterleaveOperators

    seq = tvm.transform.Sequential(
        [InterleaveOperators(strategy, order), AnnotateStreams(num_streams, policy, cores)], name="cosched.Schedule"
    )
    return seq(mod)


def build_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> Path:
    """Compile the module's TIR kernels alone into a shared library the runtime loads."""
    funcs = {
        gv: f.with_attr("global_symbol", gv.name_hint)
        for gv, f in mod.functions.items()
        if isinstance(f, tirx.PrimFunc)
    }
    kernels = tvm.compile(tvm.IRModule(funcs), target=target)
    path = Path(tempfile.mkstemp(suffix=".so", dir=_kernel_dir())[1])
    kernels.export_library(str(path))
    return path


def _device_of(target: tvm.target.Target) -> str:
    kind = target.kind.name
    if kind not in ("llvm", "cuda"):
        raise CoschedError(f"target kind {kind!r} is not supported", hint="use the host CPU (None) or 'cuda'")
    return "cpu" if kind == "llvm" else "cuda"


def build(
    tenants: Sequence[Tenant | tvm.IRModule | str | Path | bytes | onnx.ModelProto],
    target: str | dict | tvm.target.Target | None = None,
    schedule: str = "breadth_first",
    num_streams: int | None = None,
    database: str | Path | None = None,
    *,
    policy: str = "auto",
    cores: int | None = None,
    order: Sequence[str | int] | None = None,
    concat_in_place: bool | None = None,
):
    """Compile the tenants into an Artifact without loading it: works for a CUDA target on a machine
    without a GPU (cross-compilation); ``artifact.export(dir)`` then ships it.

    ``concat_in_place=False`` keeps concatenations as copy kernels (for A/Bs; by default they are
    written in place when a database is given, see ``LowerKernels``).
    """
    from cosched.runtime import Artifact

    tenants = as_tenants(tenants)
    tgt = as_target(target)
    device = _device_of(tgt)
    if schedule == "search":
        raise CoschedError("schedule='search' measures on the device", hint="use cosched.compile on the target machine")
    lowered = lower_tenants(tenants, tgt, database, concat_in_place)
    kernel_lib = build_kernels(lowered, tgt)
    annotated = schedule_module(lowered, schedule, num_streams, policy, cores, order)
    sched, params = extract_schedule(annotated)
    return Artifact(sched, kernel_lib, params, target=str(tgt), device=device, ir=annotated)


def compile(  # noqa: A001 - the name users expect, like tvm.compile
    tenants: Sequence[Tenant | tvm.IRModule | str | Path | bytes | onnx.ModelProto],
    target: str | dict | tvm.target.Target | None = None,
    schedule: str = "breadth_first",
    num_streams: int | None = None,
    database: str | Path | None = None,
    *,
    policy: str = "auto",
    cores: int | None = None,
    order: Sequence[str | int] | None = None,
    search_options: dict | None = None,
):
    """Compile several models into one co-scheduled, loaded Bundle.

    ``schedule``: an interleaving strategy (sequential, round_robin, breadth_first), "explicit" with
    ``order``, or "search" (learned co-schedule search, measured on this machine; ``search_options``
    go to :func:`cosched.search.searched_bundle`, e.g. ``work_dir``, ``generations``);
    ``num_streams`` defaults to one per tenant; ``policy`` assigns kernels to streams (auto,
    tenant, balanced, round_robin); ``database``: a MetaSchedule database directory.
    """
    searching = schedule == "search"
    artifact = build(
        tenants,
        target,
        "breadth_first" if searching else schedule,
        num_streams,
        database,
        policy=policy,
        cores=cores,
        order=order,
    )
    bundle = artifact.load()
    if searching:
        from .search import searched_bundle

        bundle, report = searched_bundle(bundle, **(search_options or {}))
        bundle.search_report = report
    return bundle


def reschedule(
    bundle,
    schedule: str = "breadth_first",
    num_streams: int | None = None,
    *,
    policy: str = "auto",
    cores: int | None = None,
    order: Sequence[str | int] | None = None,
):
    """The same kernels under another co-schedule (no recompilation)."""
    from dataclasses import replace

    if bundle.ir is None:
        raise CoschedError("this bundle carries no IR (it was loaded from disk)", hint="reschedule the compiled bundle")
    annotated = schedule_module(bundle.ir, schedule, num_streams, policy, cores, order)
    sched, params = extract_schedule(annotated)
    return replace(bundle.artifact, schedule=sched, params=params, ir=annotated).load()


__all__ = ["as_tenants", "build", "build_kernels", "compile", "lower_tenants", "reschedule", "schedule_module"]
