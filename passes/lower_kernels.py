"""LowerKernels: legalize and fuse a merged module into TIR kernels, scheduled for the target."""

from __future__ import annotations

import logging
from pathlib import Path

import tvm
import tvm_ffi
from tvm import relax, tirx

from cosched.errors import CoschedError
from cosched.tuning_db import WINOGRAD_META, read_meta

from .channels_last import ChannelsLast
from .concat_in_place import ConcatInPlace
from .simplify_inference import SimplifyInference
from .winograd import DEFAULT_RULE, WinogradConv2d, WinogradRule, default_rule

logger = logging.getLogger(__name__)


def _apply_database(target: tvm.target.Target, database: str | Path) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="cosched.ApplyDatabase")
    def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        from tvm.s_tir import meta_schedule as ms

        # The database is applied under its target: records are keyed by workload, not by tenant, so
        # a kernel shared by several tenants gets its one tuned schedule.
        with target, ms.database.JSONDatabase(work_dir=str(database), allow_missing=False):
            applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        kernels = [gv for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
        tuned = sum(not tvm_ffi.structural_equal(mod[gv], applied[gv]) for gv in kernels)
        if kernels and not tuned:
            # A silent fallback would show up only as a 10-80x slower bundle.
            logger.warning(
                "database %s has a record for none of the %d kernels (tuned for other models, or for an "
                "older cosched's kernels); they stay untuned: rerun `cosched tune --prune`",
                database,
                len(kernels),
            )
        return applied

    return apply


def _gpu_default_schedule(target: tvm.target.Target) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="cosched.GPUDefaultSchedule")
    def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        from tvm.s_tir import dlight as dl

        with target:
            return dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
            )(mod)

    return apply


def _winograd_rule(
    target: tvm.target.Target, database: str | Path | None, winograd: bool | WinogradRule | None
) -> WinogradRule | None:
    if isinstance(winograd, WinogradRule):
        return winograd
    if winograd is None and database is not None:
        # The rule the database was tuned with (none before Winograd existed), so compiling
        # makes the kernels that tuning timed: a newer default would leave new kernels untuned.
        return WinogradRule.from_json(read_meta(Path(database)).get(WINOGRAD_META))
    if winograd is None:
        return default_rule(target)
    return DEFAULT_RULE if winograd else None


def LowerKernels(  # noqa: N802
    target: tvm.target.Target,
    database: str | Path | None = None,
    weight_prepack: bool | None = None,
    channels_last: bool | None = None,
    concat_in_place: bool | None = None,
    winograd: bool | WinogradRule | None = None,
) -> tvm.transform.Pass:
    """Simplify, legalize, fold and fuse main into TIR kernels, then apply tuned (or GPU default) schedules."""
    # Prepacking lets a tuned CPU kernel read its constant weights in the layout its loops want
    # (MetaSchedule's RewriteLayout); the repacked weights are folded at compile time, so the
    # bundle's interface is unchanged. It is part of the workload, so tuning and compiling must agree.
    prepack = target.kind.name == "llvm" if weight_prepack is None else weight_prepack
    # The layout is part of every kernel's workload too: CPU databases are tuned for NHWC kernels.
    nhwc = target.kind.name == "llvm" if channels_last is None else channels_last
    passes = [SimplifyInference(), *([ChannelsLast()] if nhwc else [])]
    rule = _winograd_rule(target, database, winograd)
    if rule is not None:
        passes.append(WinogradConv2d(rule))
    passes += [relax.get_pipeline("zero"), relax.transform.DeadCodeElimination(["main"])]
    if prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    if database is not None:
        if not Path(database).is_dir():
            raise CoschedError(f"no tuning database at {database}", hint="run `cosched tune` or pass database=None")
        passes.append(_apply_database(target, database))
        if prepack:
            passes += [
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),
                # Folding leaves tuples of repacked weights and aliases; the kernel graph wants plain calls.
                relax.transform.CanonicalizeBindings(),
                relax.transform.DeadCodeElimination(["main"]),
            ]
    if target.kind.name == "cuda":
        passes.append(_gpu_default_schedule(target))
    # Writing into a concatenation changes its producers' workloads, so it follows the database:
    # without one, the kernels stay as tuning extracts them.
    if database is not None if concat_in_place is None else concat_in_place:
        passes.append(ConcatInPlace())
    return tvm.transform.Sequential(passes, name="LowerKernels")
