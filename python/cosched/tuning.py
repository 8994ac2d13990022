"""Tune the kernels of several models together with MetaSchedule, into one JSON database.

Models that share a bundle often share kernels (the same conv shape in two nets): such a workload
is tuned once, with the summed weight of its callers. Tasks are tuned one at a time, costliest
first, so a time budget goes where the latency is, and every finished measurement is already on
disk: an interrupted run loses nothing and a rerun resumes where it stopped.

The database is MetaSchedule's ``JSONDatabase`` (``database_workload.json`` and
``database_tuning_record.json``) plus ``cosched_target.json``, which names the target it was tuned
for and how many trials each workload has had. Apply it with::

    with target, ms.database.JSONDatabase(work_dir=work_dir):
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
"""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops
from tvm.s_tir.meta_schedule.builder.local_builder import default_export
from tvm.s_tir.meta_schedule.utils import shash2hex
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from .errors import CoschedError
from .injective_schedule import injective_candidates
from .target import target_key

logger = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "cosched_target.json"

# Records with this run time (or more) are MetaSchedule's marker for a failed build or run.
_FAILED_SECS = 1e9


@dataclass
class TaskInfo:
    """One distinct kernel workload and the modules that call it."""

    name: str
    """``<first user>.<MetaSchedule task name>``: unique across modules."""
    mod: tvm.IRModule
    """The workload as MetaSchedule's database keys it: one PrimFunc named ``main``."""
    weight: int
    """Calls per inference of all users together."""
    flops: float
    """Estimated floating-point operations per call."""
    users: list[str] = field(default_factory=list)
    """Names of the modules that call this kernel."""
    key: str = ""
    """Structural hash of the workload as hex (computed when not given)."""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = shash2hex(self.mod)

    @property
    def cost(self) -> float:
        """Estimated work per inference of all users; tuning goes costliest first."""
        # Data-movement kernels count zero FLOPs but still take time: never rank them as free.
        return self.weight * max(self.flops, 1.0)


@dataclass
class TuneReport:
    """What one ``tune_modules`` run did."""

    tasks_total: int
    """Tasks summed over the modules, before deduplication."""
    tasks_deduped: int
    """Distinct workloads, i.e. tasks after deduplication."""
    trials_run: int
    """Measurements made by this run (resumed records not counted)."""
    seconds: float
    best_us: dict[str, float] = field(default_factory=dict)
    """Best measured latency per task name, in microseconds (from this and earlier runs)."""
    tasks_tuned: int = 0
    """Tasks that got trials in this run (from ``tune``: in any of its passes)."""
    tuned: list[str] = field(default_factory=list)
    """Their names."""
    best_before_us: dict[str, float] = field(default_factory=dict)
    """Best latency before this run of each tuned task that had a record (``tune`` only)."""
    tasks_skipped: int = 0
    """Tasks that already had all their trials in the database."""
    tasks_left: int = 0
    """Tasks not reached before the time budget ran out."""
    tasks_stopped_early: int = 0
    """Tasks whose search stopped before its trials because measurements stopped improving."""
    trials_saved: int = 0
    """Trials the early stops did not spend."""
    trials_transferred: int = 0
    """Trials spent measuring schedules transferred from tuned workloads of the same family."""
    records_remeasured: int = 0
    """Records timed again because the database had been measured at another thread count."""
    trials_injective: int = 0
    """Trials spent measuring ``injective_candidates`` schedules of element-wise and concat kernels."""
    work_dir: str = ""

    @property
    def dedup_saved(self) -> int:
        """Tasks that deduplication saved tuning."""
        return self.tasks_total - self.tasks_deduped


# ----------------------------------------------------------------------------------------------
# Task extraction


def _flops(mod: tvm.IRModule) -> float:
    try:
        return float(estimate_tir_flops(mod))
    except (RuntimeError, ValueError):  # TVM errors: the analysis rejects some loop nests
        return 0.0


def extract_tasks(
    mods: Sequence[tvm.IRModule],
    target: tvm.target.Target,
    names: Sequence[str] | None = None,
) -> list[TaskInfo]:
    """MetaSchedule tasks of several lowered Relax modules, identical workloads merged.

    Each module must already be lowered to TIR (``relax.get_pipeline("zero")``). Two tasks are the
    same workload when their PrimFuncs are structurally equal, which is how ``JSONDatabase`` keys
    records: one tuning then serves every module. The weights of merged tasks add up. The result
    is in extraction order; ``sum(len(t.users) for t in tasks) - len(tasks)`` is what dedup saved.
    """
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    names = list(names) if names is not None else [f"mod{i}" for i in range(len(mods))]
    if len(names) != len(mods):
        raise CoschedError(f"{len(names)} names for {len(mods)} modules", hint="give one name per module")
    tasks: list[TaskInfo] = []
    # Structural hash buckets the candidates; structural equality decides (hashes can collide).
    buckets: dict[int, list[TaskInfo]] = {}
    total = 0
    for mod, name in zip(mods, names, strict=True):
        for ext in ms.relax_integration.extract_tasks(mod, target):
            if ext.mod.attrs and ext.mod.attrs.get("tirx.is_scheduled", False):
                continue  # already scheduled by hand: MetaSchedule would skip it too
            total += 1
            work = ext.dispatched[0]
            h = tvm_ffi.structural_hash(work)
            same = next((t for t in buckets.get(h, []) if tvm_ffi.structural_equal(t.mod, work)), None)
            if same is not None:
                same.weight += int(ext.weight)
                if name not in same.users:
                    same.users.append(name)
                continue
            info = TaskInfo(f"{name}.{ext.task_name}", work, int(ext.weight), _flops(work), [name])
            buckets.setdefault(h, []).append(info)
            tasks.append(info)
    logger.info(
        "extracted %d tasks from %d modules, %d after dedup (saved %d)",
        total,
        len(mods),
        len(tasks),
        total - len(tasks),
    )
    return tasks


# ----------------------------------------------------------------------------------------------
# The database directory


def _read_meta(work_dir: Path) -> dict:
    try:
        return json.loads((work_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_meta(work_dir: Path, meta: dict) -> None:
    # Write-then-rename: a kill mid-write must not leave a half file that hides the target.
    fd, tmp = tempfile.mkstemp(dir=work_dir, prefix=".meta", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the database is meant to be shipped
    os.replace(tmp, work_dir / META_FILE)


def check_database(work_dir: str | os.PathLike, target: tvm.target.Target) -> None:
    """Raise ``CoschedError`` unless ``work_dir`` holds a database tuned for ``target``.

    Records tuned for another CPU (or kind of device) would apply silently and run slowly, or not
    at all, so a mismatch of ``target_key`` (kind, mcpu, arch, mattr) is refused.
    """
    path = Path(work_dir)
    if not path.is_dir():
        raise CoschedError(
            f"no tuning database at {path}",
            hint="run cosched.tuning.tune_modules first, or pass the directory that holds database_workload.json",
        )
    missing = [f for f in (WORKLOAD_FILE, RECORD_FILE, META_FILE) if not (path / f).is_file()]
    if missing == [META_FILE]:
        raise CoschedError(
            f"the tuning database at {path} has no {META_FILE}, so its target is unknown",
            hint="tune it again with cosched.tuning.tune_modules, which records the target",
        )
    if missing:
        raise CoschedError(
            f"the tuning database at {path} lacks {', '.join(missing)}",
            hint="tune into this directory with cosched.tuning.tune_modules (it resumes what is there)",
        )
    tuned_for = _read_meta(path).get("target")
    if not isinstance(tuned_for, dict):
        raise CoschedError(f"{path / META_FILE} is unreadable", hint="tune again into a fresh directory")
    wanted = target_key(target)
    if tuned_for != wanted:
        raise CoschedError(
            f"the database at {path} was tuned for {tuned_for}, not for {wanted}",
            hint="tune for this target into another directory (tune_modules), "
            "or compile for the target the database was tuned for",
        )


def _repair_truncated(path: Path) -> None:
    """Drop a partial last line left by a kill during a write; JSONDatabase cannot parse it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    head, _, tail = data.rpartition(b"\n")
    try:
        json.loads(tail)
        path.write_bytes(data + b"\n")
    except ValueError:
        logger.warning("dropping a truncated record at the end of %s", path)
        path.write_bytes(head + b"\n" if head else b"")


def open_database(work_dir: str | os.PathLike) -> ms.database.JSONDatabase:
    """The ``JSONDatabase`` in ``work_dir``, a line cut short by a kill dropped first.

    Opening replays every record's trace on its workload (about 3 ms per record on the DenseNet
    mix), so one run should open it once (``tune_modules(database=...)``).
    """
    work_dir = Path(work_dir)
    for name in (WORKLOAD_FILE, RECORD_FILE):
        _repair_truncated(work_dir / name)
    return ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")


def _records_per_workload(db: ms.database.Database, tasks: Sequence[TaskInfo]) -> dict[str, int]:
    """How many records (failed ones included) the database holds for each task's workload."""
    known = {t.key: db.commit_workload(t.mod) for t in tasks if db.has_workload(t.mod)}
    counts = dict.fromkeys((t.key for t in tasks), 0)
    # JSONDatabase shares one Workload object among its records, so identity finds them.
    for rec in db.get_all_tuning_records():
        for key, wl in known.items():
            if rec.workload.same_as(wl):
                counts[key] += 1
                break
    return counts


def _best_record(db: ms.database.Database, task: TaskInfo) -> ms.database.TuningRecord | None:
    """The fastest valid record of the task's workload, if the database has one."""
    # has_workload first: commit_workload would add an unknown workload to the database.
    top = db.get_top_k(db.commit_workload(task.mod), 1) if db.has_workload(task.mod) else []
    return top[0] if top else None


def _best_us(db: ms.database.Database, task: TaskInfo) -> float | None:
    best = _best_record(db, task)
    if best is None:
        return None
    secs = [float(s) for s in best.run_secs]
    return sum(secs) / len(secs) * 1e6


def _minify_workload(line: str) -> str:
    """One line of the workload table with its IR's JSON unindented (about half the size).

    A line is ``[shash, base64(u64 length + JSON of the IRModule)]``; TVM writes that JSON
    indented. The parser does not care, so the same document without whitespace loads the same.
    """
    shash, blob = json.loads(line)
    raw = base64.b64decode(blob)
    (length,) = struct.unpack("<Q", raw[:8])
    if length != len(raw) - 8:
        return line  # not the layout this was written for: leave it alone
    text = json.dumps(json.loads(raw[8:]), separators=(",", ":")).encode()
    return json.dumps([shash, base64.b64encode(struct.pack("<Q", len(text)) + text).decode()])


def _install_database(tmp: Path, path: Path) -> None:
    """Move a database's two files, written complete under ``tmp``, into ``path`` (workloads first)."""
    for name in (WORKLOAD_FILE, RECORD_FILE):
        os.chmod(tmp / name, 0o644)  # temporary files are private; the database is meant to be shipped
        os.replace(tmp / name, path / name)


def compact_database(
    work_dir: str | os.PathLike,
    keep: Sequence[TaskInfo] | None = None,
    database: ms.database.JSONDatabase | None = None,
) -> int:
    """Keep only the best valid record per workload and unindent the workloads' IR.

    With ``keep``, only the records of those tasks' workloads stay: the others belong to kernels
    the models no longer have (e.g. after a TVM or pass change altered them) and only cost space.
    Returns how many records remain. The trial counts in ``cosched_target.json`` are kept (for the
    kept workloads), so a later ``tune_modules`` still knows which are done and does not tune them again.
    ``database`` is ``work_dir``'s database if already open; it must not be used afterwards (the
    files under it are replaced).
    """
    path = Path(work_dir)
    db = open_database(path) if database is None else database
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        pruned = ms.database.JSONDatabase(work_dir=tmp, module_equality="structural")
        if keep is None:
            db.dump_pruned(pruned)
        else:
            for task in keep:
                if (best := _best_record(db, task)) is not None:
                    workload = pruned.commit_workload(task.mod)
                    pruned.commit_tuning_record(
                        ms.database.TuningRecord(best.trace, workload, best.run_secs, best.target, best.args_info)
                    )
            meta = _read_meta(path)
            keys = {t.key for t in keep}
            meta["trials"] = {k: n for k, n in meta.get("trials", {}).items() if k in keys}
            meta["injective"] = [k for k in meta.get("injective", []) if k in keys]
            _write_meta(path, meta)
        kept = len(pruned.get_all_tuning_records())
        workloads = (Path(tmp) / WORKLOAD_FILE).read_text().splitlines()
        (Path(tmp) / WORKLOAD_FILE).write_text("".join(_minify_workload(w) + "\n" for w in workloads if w))
        _install_database(Path(tmp), path)
    return kept


# ----------------------------------------------------------------------------------------------
# Cheaper MetaSchedule plumbing

_INTRIN_PKG = "tvm.s_tir.tensor_intrin"


def _host_intrin_modules() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return [f"{_INTRIN_PKG}.x86"]
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return [f"{_INTRIN_PKG}.arm_cpu"]
    return []


def _stand_in_for_intrinsics() -> ModuleType | None:
    """Register only the host CPU's tensor intrinsics; returns the stand-in package, if made.

    ``TuneContext`` and MetaSchedule's default builder import ``tvm.s_tir.tensor_intrin``, whose
    ``__init__`` parses the TVMScript of every GPU and DSP intrinsic too: 16 s of one core per
    process on these machines (the CUDA ones alone 11 s), paid again by every builder process of
    every build batch. A CPU's schedule rules only need its own intrinsics, so a bare module
    stands in for the package while they load (and after: the importers find it in sys.modules).
    """
    if _INTRIN_PKG in sys.modules:
        return None
    spec = importlib.util.find_spec(_INTRIN_PKG)
    stub = importlib.util.module_from_spec(spec)  # created, not executed
    sys.modules[_INTRIN_PKG] = stub
    for name in _host_intrin_modules():
        importlib.import_module(name)
    return stub


@contextlib.contextmanager
def _cpu_intrinsics_only(target: tvm.target.Target) -> Iterator[None]:
    """Use the stand-in for a CPU target while tuning; remove it afterwards.

    Once removed, a later plain import runs the real ``__init__``; the submodules loaded here
    stay in sys.modules, so nothing is registered twice.
    """
    stub = _stand_in_for_intrinsics() if target.kind.name == "llvm" else None
    try:
        yield
    finally:
        if stub is not None and sys.modules.get(_INTRIN_PKG) is stub:
            del sys.modules[_INTRIN_PKG]
            parent = sys.modules.get(_INTRIN_PKG.rpartition(".")[0])
            if parent is not None and getattr(parent, "tensor_intrin", None) is stub:
                delattr(parent, "tensor_intrin")


def _build_in_worker(args: tuple[tvm.IRModule, tvm.target.Target]) -> str:
    """MetaSchedule's default_build + default_export, run in a builder process."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod, target = args
    if target.kind.name == "llvm":
        _stand_in_for_intrinsics()  # the worker is ours: the stand-in may stay
    else:
        importlib.import_module(_INTRIN_PKG)
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return default_export(tvm_build(mod, target=target))


@derived_object
class _PooledBuilder(ms.builder.PyBuilder):
    """``LocalBuilder`` with worker processes kept across build batches.

    ``LocalBuilder`` starts a fresh process pool for every batch (against a slow leak), so every
    task pays the workers' start-up. Here workers live for ``max_uses`` builds each instead.
    """

    def __init__(self, max_workers: int, timeout_sec: float = 30.0, max_uses: int = 64) -> None:
        super().__init__()
        self.timeout_sec = timeout_sec
        self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, maximum_process_uses=max_uses)

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        results = []
        jobs = [(inp.mod, inp.target) for inp in build_inputs]
        for res in self.pool.map_with_error_catching(_build_in_worker, jobs):
            if res.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {res.value}"))
        return results

    def shutdown(self) -> None:
        self.pool.shutdown()


# ----------------------------------------------------------------------------------------------
# Tuning


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Counts trials and tracks the best latency as measurements come in."""

    def __init__(self, on_batch) -> None:
        super().__init__()
        self.on_batch = on_batch

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        measured = [us for res in runner_results if (us := _mean_us(res)) is not None]
        self.on_batch(len(runner_results), min(measured) if measured else None)


MIN_GAIN = 0.02
"""The improvement an early-stopping task counts as a gain (``tune_modules``'s default ``min_gain``)."""


def depth_patience(patience: int | None, trials_had: int) -> int | None:
    """The early stop's patience for a workload that already had ``trials_had`` trials: at least half
    of them, since a deep pass finds its gains late (``benchmarks/patience_depth.py``)."""
    return None if patience is None else max(patience, trials_had // 2)


def early_stop_step(
    best_us: float | None, stale: int, batch_us: Sequence[float], trials: int, min_gain: float
) -> tuple[float | None, int]:
    """The best latency and the trials since the last ``min_gain`` gain, after a batch of ``trials``
    measurements of which ``batch_us`` are the valid latencies."""
    if batch_us and (best_us is None or min(batch_us) < best_us * (1.0 - min_gain)):
        stale = 0
    else:
        stale += trials
    if batch_us:
        best_us = min(batch_us) if best_us is None else min(best_us, min(batch_us))
    return best_us, stale


@derived_object
class _Guided(ms.search_strategy.PySearchStrategy):
    """Evolutionary search that first measures schedules transferred from tuned workloads of the same
    family, and ends the task once ``patience`` trials brought no ``min_gain`` improvement.

    Both go through the strategy (candidates handed out, or none), so MetaSchedule's scheduler
    builds, measures, records and trains on them the ordinary way.
    """

    def __init__(
        self,
        inner,
        patience: int | None,
        min_gain: float,
        best_us: float | None,
        outcome: dict,
        donors: list | None = None,
        injective: Sequence[tvm.s_tir.Schedule] = (),
    ) -> None:
        super().__init__()
        self.inner, self.patience, self.min_gain = inner, patience, min_gain
        self.best_us = best_us
        self.stale = 0  # trials since the last real improvement
        self.donors = list(donors or [])  # traces of tuned workloads of the same family
        self.injective = list(injective)  # injective_candidates of the task, measured first
        self.context = None
        # Shared with clones (TuneContext clones its strategy): how the task ended, for the report.
        self.outcome = outcome
        self.outcome.update(stopped=False, measured=0, transferred=0, injective=0)

    def _initialize_with_tune_context(self, context) -> None:
        self.context = context
        self.inner._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        if self.outcome["stopped"]:
            return None
        first = []
        if self.donors:
            donors, self.donors = self.donors, []
            first = transfer_candidates(self.context, donors)
            self.outcome["transferred"] = len(first)
        if self.injective:
            schedules, self.injective = self.injective, []
            # Post-processing edits a schedule in place: a clone's copy of the list stays untouched.
            own = [_candidate(self.context, sch.copy()) for sch in schedules]
            own = [c for c in own if c is not None]
            self.outcome["injective"] = len(own)
            first += own
        return first or self.inner.generate_measure_candidates()

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.inner.notify_runner_results(measure_candidates, results)
        self.outcome["measured"] += len(results)
        batch = [us for r in results if (us := _mean_us(r)) is not None]
        self.best_us, self.stale = early_stop_step(self.best_us, self.stale, batch, len(results), self.min_gain)
        self.outcome["stopped"] = self.patience is not None and self.stale >= self.patience

    def clone(self):
        return _Guided(
            self.inner.clone(), self.patience, self.min_gain, self.best_us, self.outcome, self.donors, self.injective
        )


def family(task: TaskInfo) -> str:
    """Workloads that may share a schedule: the same fused operators (their names differ by a counter)."""
    # "fused_conv2d17_add9_relu91" -> "fused_conv2d_add_relu": counters end a name part, "2d" stays.
    return re.sub(r"\d+(?=_|$)", "", task.name.split(".", 1)[-1])


def nearest_tiling(extent: int, old: Sequence[int], max_innermost: int = 0) -> list[int]:
    """Factors of ``extent``, as many as ``old``, each as close to the old one as divisibility allows."""
    rest, inner = extent, []
    for i, f in enumerate(reversed(list(old)[1:])):
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        if i == 0 and max_innermost > 0:
            divisors = [d for d in divisors if d <= max_innermost]
        d = min(divisors, key=lambda d: abs(math.log(d) - math.log(max(int(f), 1))))
        inner.append(d)
        rest //= d
    return [rest, *reversed(inner)]


def transfer_candidates(context: ms.TuneContext, traces: Sequence) -> list[ms.MeasureCandidate]:
    """Replay donor traces on this task's workload, tile sizes refitted to its loop extents.

    A trace whose structure does not fit (other blocks, an invalid compute location) or that the
    post-processors reject is skipped.
    """
    out = []
    for trace in traces:
        sch = tvm.s_tir.Schedule(context.mod)

        def refit(inst, inputs, attrs, decision, sch=sch):
            if inst.kind.name != "SamplePerfectTile" or decision is None:
                return decision
            extent = int(sch.get(inputs[0]).extent)
            return nearest_tiling(extent, [int(d) for d in decision], int(attrs[1]))

        try:
            trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=refit)
        except Exception:  # TVM raises many kinds for a trace that does not fit
            continue
        if (candidate := _candidate(context, sch)) is not None:
            out.append(candidate)
    return out


def _candidate(context: ms.TuneContext, sch: tvm.s_tir.Schedule) -> ms.MeasureCandidate | None:
    """``sch`` post-processed as the task's own candidates are; None if a post-processor rejects it."""
    try:
        # The marker lets a later replay (the search's initial population) drop these again.
        sch.enter_postproc()
        if not all(post.apply(sch) for post in context.space_generator.postprocs):
            return None
    except Exception:  # as in transfer_candidates
        return None
    return ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True))


def _mean_us(result: ms.runner.RunnerResult) -> float | None:
    """A successful measurement's mean latency in microseconds; None for a failed one."""
    if result.error_msg is not None or not result.run_secs:
        return None
    secs = [float(s) for s in result.run_secs]
    mean = sum(secs) / len(secs)
    return mean * 1e6 if mean < _FAILED_SECS else None


def _num_cores(target: tvm.target.Target) -> int:
    cores = target.attrs.get("num-cores") if target.attrs else None
    return int(cores) if cores else max(1, os.cpu_count() or 1)


def _failed(result: ms.runner.RunnerResult | str) -> bool:
    return isinstance(result, str) or _mean_us(result) is None


def _measure_on_threads(threads: int) -> None:
    """Runner worker initializer: time candidates on ``threads`` threads, as a bundle runs them.

    TVM's pool defaults to half the cores (one on a 2-core host), so without this every candidate
    was timed on one thread and the search favoured schedules that do not scale to the target's cores.
    """
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ["TVM_BIND_THREADS"] = "0"  # as cosched.runtime runs kernels


COLD_RUNS = 32
"""Runs timed per candidate when tuning with ``cache_flush``, each after its own flush."""


def cold_evaluator() -> ms.runner.EvaluatorConfig:
    """Time single runs, each right after the caches were flushed of every argument but the input."""
    # TVM's time evaluator flushes once per repeat, and MetaSchedule's default repeat runs the kernel
    # for 100 ms: every run after the first found its weights warm again. One run per repeat is
    # the cold timing (ResNet-50's records: 25.2 ms summed, 17.1 warm and 17.1 flushed the old way;
    # benchmarks/results/cold-timing-resnet50-znver5.txt).
    return ms.runner.EvaluatorConfig(number=1, repeat=COLD_RUNS, min_repeat_ms=0, enable_cpu_cache_flush=True)


def _local_runner(cores: int, cache_flush: bool) -> ms.runner.LocalRunner:
    """MetaSchedule's local runner, its worker timing every candidate on ``cores`` threads."""
    return ms.runner.LocalRunner(
        evaluator_config=cold_evaluator() if cache_flush else None,
        initializer=functools.partial(_measure_on_threads, cores),
    )


def _timed_as(meta: dict, cores: int, cache_flush: bool) -> bool:
    """Whether the database's records were timed on ``cores`` threads with caches flushed or not."""
    if meta.get("threads") != cores:
        return False
    if not cache_flush:
        return not meta.get("cache_flush", False)
    # A database tuned with cache_flush before ``cold_evaluator`` was timed warm and is timed again.
    return bool(meta.get("cache_flush")) and meta.get("cold_runs") == COLD_RUNS


def _set_timed_as(meta: dict, cores: int, cache_flush: bool) -> None:
    """Record in ``meta`` how the database's records are timed (``_timed_as``)."""
    meta["threads"] = cores
    meta["cache_flush"] = cache_flush
    if cache_flush:
        meta["cold_runs"] = COLD_RUNS
    else:
        meta.pop("cold_runs", None)


def time_records(
    records: Sequence[ms.database.TuningRecord],
    target: tvm.target.Target,
    cores: int,
    runners: Sequence[ms.runner.LocalRunner],
) -> list[list[ms.runner.RunnerResult | str]]:
    """Each record built once and timed by each of ``runners`` (shut down here): per runner, a result
    per record, or the build error (str) of a record that did not build."""
    builder = _PooledBuilder(max_workers=cores)
    try:
        candidates = [rec.as_measure_candidate() for rec in records]
        built = builder.build([ms.builder.BuilderInput(c.sch.mod, target) for c in candidates])
        device = tvm.runtime.device(target.get_target_device_type()).type
        inputs = [
            ms.runner.RunnerInput(b.artifact_path, device, c.args_info)
            for b, c in zip(built, candidates, strict=True)
            if b.error_msg is None
        ]
        timed = []
        for runner in runners:
            results = iter([f.result() for f in runner.run(inputs)])
            timed.append([next(results) if b.error_msg is None else b.error_msg for b in built])
        return timed
    finally:
        builder.shutdown()
        for runner in runners:
            runner.pool.shutdown()


def remeasure_database(work_dir: str | os.PathLike, target: tvm.target.Target, cache_flush: bool = False) -> int:
    """Time each workload's best record again if ``work_dir`` was measured another way.

    Latencies taken on one thread and on all the target's cores cannot be compared, nor those taken
    with warm and with flushed caches, so a database keeps how it was timed in ``cosched_target.json``
    (``threads``, absent: measured before cosched recorded it, at TVM's default; ``cache_flush``,
    absent: warm). Only the best record per workload is kept and retimed
    (one build and run each); a record that no longer builds or runs is dropped and its workload's
    trial count cleared, so tuning covers it again. Returns how many records were timed; 0 when the
    database already matches. The files are replaced only when every record has been timed.
    """
    path = Path(work_dir)
    cores = _num_cores(target)
    meta = _read_meta(path)
    if _timed_as(meta, cores, cache_flush) or not (path / RECORD_FILE).is_file():
        return 0
    db = open_database(path)
    best = {}
    for rec in db.get_all_tuning_records():
        key = shash2hex(rec.workload.mod)
        if key not in best and (top := db.get_top_k(rec.workload, 1)):
            best[key] = top[0]
    records = list(best.values())
    logger.info(
        "timing %d records again on %d threads, cache flush %s (measured on %s, cache flush %s)",
        len(records),
        cores,
        cache_flush,
        meta.get("threads"),
        bool(meta.get("cache_flush", False)),
    )
    (timed,) = time_records(records, target, cores, [_local_runner(cores, cache_flush)])
    # A build error (str), a run error, or a run without a valid time.
    failures = [res if isinstance(res, str) else res.error_msg or "no valid time" for res in timed if _failed(res)]
    if records and len(failures) == len(records):
        raise CoschedError(
            f"none of the {len(records)} records in {path} could be timed again: {failures[0][:300]}",
            hint="check that this machine can run the target's code; the database was left as it was",
        )
    trials = meta.setdefault("trials", {})
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        fresh = ms.database.JSONDatabase(work_dir=tmp, module_equality="structural")
        for rec, res in zip(records, timed, strict=True):
            if _failed(res):
                key = shash2hex(rec.workload.mod)
                trials.pop(key, None)
                if key in meta.get("injective", []):
                    meta["injective"].remove(key)
                logger.warning("dropped a record that no longer builds or runs: %s", str(res)[:300])
                continue
            workload = fresh.commit_workload(rec.workload.mod)
            fresh.commit_tuning_record(
                ms.database.TuningRecord(rec.trace, workload, res.run_secs, target, rec.args_info)
            )
        _install_database(Path(tmp), path)
    _set_timed_as(meta, cores, cache_flush)
    _write_meta(path, meta)
    return len(records)


@dataclass(frozen=True)
class SearchSize:
    """How many schedules the evolutionary search samples and evolves to pick the ones it measures.

    MetaSchedule's defaults (512 schedules, 4 generations) are sized for hundreds of trials per
    task. For a handful, sampling and post-processing those schedules is most of a task's time on a
    2-core host (3.4 s of 4.2 s per SqueezeNet task at 2 trials), while the cost model that ranks
    them has seen too little to tell them apart; a population of 16 per trial and one generation
    tune 3-4x the tasks per minute.
    """

    per_trial: int = 16
    """Population per trial measured in a batch."""
    generations: int = 1
    """Rounds of mutation under the cost model after the initial sample."""
    min_population: int = 32
    max_population: int = 512

    def strategy(self, trials: int) -> ms.search_strategy.EvolutionarySearch:
        """The search for a batch of ``trials`` measurements."""
        population = max(self.min_population, min(self.max_population, self.per_trial * trials))
        return ms.search_strategy.EvolutionarySearch(
            population_size=population,
            genetic_num_iters=self.generations,
            # Unmeasured samples wanted in the initial population: never more than it holds.
            init_min_unmeasured=min(50, population),
        )


PREVIOUS_SEARCH_SIZE = SearchSize(per_trial=64, generations=4, min_population=64)
"""The sizes cosched used before ``SearchSize`` (kept for A/B runs against it). Even for deep passes
it found no faster kernels than ``SearchSize``: two Inception-v2 workloads given 256 more trials
each way came out within 1.2% of each other, the full-size search 1.3x slower to run."""


def _has_records(path: Path) -> bool:
    return any((path / f).is_file() and (path / f).stat().st_size for f in (WORKLOAD_FILE, RECORD_FILE))


def start_database(work_dir: str | os.PathLike, source: str | os.PathLike, target: tvm.target.Target) -> bool:
    """Start an empty ``work_dir`` for ``target`` from ``source``, a database tuned for another CPU.

    A record is a schedule, not machine code, so one tuned on another CPU of the same kind still
    builds for this one, and is a far better start than nothing (an untuned CPU kernel is
    single-threaded). The copied records keep their workloads but not their trial counts: the next
    ``tune_modules`` times each again here (``remeasure_database``: the meta has no ``threads``),
    then tunes every workload anew, its evolutionary search seeded with the copied best. The meta
    records where they came from (``started_from``). Returns False, copying nothing, when
    ``work_dir`` already holds records: a rerun resumes them.
    """
    path, src = Path(work_dir), Path(source)
    # Records, not workloads: a copy killed between the two files is started again.
    if (path / RECORD_FILE).is_file() and (path / RECORD_FILE).stat().st_size:
        return False
    if not all((src / f).is_file() for f in (WORKLOAD_FILE, RECORD_FILE)):
        raise CoschedError(
            f"no tuning database at {src} to start from",
            hint="pass a directory that holds database_workload.json, e.g. databases/<cpu>/<mix>",
        )
    tuned_for = _read_meta(src).get("target")
    if not isinstance(tuned_for, dict) or tuned_for.get("kind") != target.kind.name:
        raise CoschedError(
            f"the database at {src} was tuned for {tuned_for}, not for a {target.kind.name} target: "
            "its schedules do not carry over",
            hint="start from a database tuned for the same kind of device, or tune from scratch",
        )
    path.mkdir(parents=True, exist_ok=True)
    # Meta, workloads, records, in that order: a kill before the records leaves a directory that a
    # rerun starts again.
    started = {"path": str(src), "target": tuned_for}
    _write_meta(path, {"target": target_key(target), "trials": {}, "injective": [], "started_from": started})
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        for name in (WORKLOAD_FILE, RECORD_FILE):
            shutil.copyfile(src / name, Path(tmp) / name)
        _install_database(Path(tmp), path)
    logger.info("started %s from the records of %s (tuned for %s)", path, src, tuned_for)
    return True


def _prepare_work_dir(
    path: Path, target: tvm.target.Target, cache_flush: bool = False, start_from: str | os.PathLike | None = None
) -> dict:
    """Create ``path`` or check that what it holds was tuned for ``target``; returns the meta.

    ``start_from``: a database of another CPU that an empty ``path`` starts from (``start_database``).
    """
    path.mkdir(parents=True, exist_ok=True)
    if start_from is not None:
        start_database(path, start_from, target)
    has_db = _has_records(path)
    if has_db or (path / META_FILE).is_file():
        check_database(path, target)  # never mix records of two targets in one directory
    meta = _read_meta(path)
    meta["target"] = target_key(target)
    meta.setdefault("trials", {})
    meta.setdefault("injective", [])
    if not has_db:  # how records are timed: remeasure_database compares the next runs' with it
        _set_timed_as(meta, _num_cores(target), cache_flush)
    _write_meta(path, meta)
    return meta


class _ProgressBar:
    """tqdm over tasks: trials so far, best latency of the current task, budget left."""

    def __init__(self, total: int, done: int, budget_s: float | None, start: float, enabled: bool):
        from tqdm.auto import tqdm  # only needed while tuning

        self.bar = tqdm(total=total, initial=done, unit="task", desc="tuning", disable=not enabled, dynamic_ncols=True)
        self.budget_s, self.start = budget_s, start
        self.trials = 0  # all trials of this run
        self.task_trials = 0
        self.task_best_us: float | None = None

    def start_task(self, task: TaskInfo, best_us: float | None) -> None:
        self.task_trials, self.task_best_us = 0, best_us
        self.bar.set_description(f"tuning {task.name[:40]}")
        self.refresh()

    def on_batch(self, trials: int, best_us: float | None) -> None:
        self.trials += trials
        self.task_trials += trials
        if best_us is not None and (self.task_best_us is None or best_us < self.task_best_us):
            self.task_best_us = best_us
        self.refresh()

    def refresh(self) -> None:
        post: dict[str, object] = {"trials": self.trials}
        if self.task_best_us is not None:
            post["best_us"] = f"{self.task_best_us:.1f}"
        if self.budget_s is not None:
            post["left_s"] = max(0, int(self.budget_s - (time.monotonic() - self.start)))
        self.bar.set_postfix(post, refresh=True)

    def task_done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def select_kernels(tasks: Sequence[TaskInfo], patterns: Sequence[str] | None) -> list[TaskInfo]:
    """The tasks whose kernel (``fused_conv2d3_add2_add3_relu21``, as ``Bundle.profile`` and
    ``benchmarks/kernel_breakdown.py`` name it without ``_prepacked``) or full task name
    (``resnet50.fused_...``) matches one of ``patterns`` (regular expressions, whole name); all with
    none. A pattern that matches nothing is refused: a typo would otherwise tune nothing quietly.
    """
    if not patterns:
        return list(tasks)
    chosen: dict[str, TaskInfo] = {}
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise CoschedError(f"kernel pattern {pattern!r} is no regular expression: {err}") from None
        matched = [t for t in tasks if regex.fullmatch(t.name) or regex.fullmatch(t.name.split(".", 1)[-1])]
        if not matched:
            sample = ", ".join(sorted(t.name.split(".", 1)[-1] for t in tasks)[:6])
            raise CoschedError(
                f"no kernel of these models is named {pattern!r}",
                hint=f"kernels are named like {sample}, ... (benchmarks/kernel_breakdown.py lists them)",
            )
        chosen.update((t.key, t) for t in matched)
    return list(chosen.values())


def tune_modules(
    mods: Sequence[tvm.IRModule],
    target: tvm.target.Target,
    work_dir: str | os.PathLike,
    *,
    trials_per_task: int = 8,
    time_budget_s: float | None = None,
    names: Sequence[str] | None = None,
    progress: bool = True,
    max_tasks: int | None = None,
    seed: int | None = 0,
    patience: int | None = 16,
    min_gain: float = MIN_GAIN,
    transfer: bool = False,
    search: SearchSize = SearchSize(),
    database: ms.database.JSONDatabase | None = None,
    cache_flush: bool = False,
    start_from: str | os.PathLike | None = None,
    kernels: Sequence[str] | None = None,
) -> TuneReport:
    """Tune the kernels of lowered Relax modules into a ``JSONDatabase`` in ``work_dir``.

    Identical workloads across modules are tuned once (``extract_tasks``). Workloads without a
    record go first, costliest (weight x FLOPs) first; then those with one, by their measured time
    per inference (weight x best latency), so that a deeper pass spends its trials where the bundle
    spends its time. Each gets ``trials_per_task`` trials of evolutionary search guided by
    MetaSchedule's XGBoost cost model, which is shared by all tasks so later tasks start from what
    earlier ones taught it. A task is not started once ``time_budget_s`` is spent, nor when the
    time it would take (the mean of the tasks so far) would overrun the budget; a task already
    running is finished. ``max_tasks`` caps how many tasks get trials in this run.

    Transfer: a workload with no record yet first measures the best schedules of up to half its
    trials' worth of tuned workloads of the same family (the same fused operators at other shapes),
    replayed with tile sizes refitted to its loops; the search then starts from whatever measured
    best. Off by default: on SqueezeNet at 4 trials per task the bundle came out 0.78x as fast as
    without (``benchmarks/tuning_ab.py --arms sized transfer``).

    Early stop: a task whose last ``patience`` trials did not improve its best latency (including
    records from earlier runs) by ``min_gain`` ends there and counts as complete; its search then
    goes in batches of ``patience // 2`` so that the check comes often. A workload that already had
    N trials waits at least N / 2: deeper passes find their gains later (on Inception-v2's 16
    costliest workloads, after 256 trials each, the next 256 found gains of 5-18% after 54-178 trials
    without one; N / 2 kept 98% of that pass's gain, 16 kept 52%). ``patience=None`` spends every trial.

    Resumable: records are appended to the database as they are measured, and a workload that
    already has its trials (counted from the records and ``cosched_target.json``) is skipped, one
    with fewer gets only the rest; so a second call with more ``trials_per_task`` refines. A
    directory tuned for another target is refused.

    ``search`` sizes the evolutionary search that picks each batch of candidates (``SearchSize``).
    ``database`` is ``work_dir``'s database if already open (``open_database``): opening replays
    every record, so callers that tune in several calls open it once.

    Candidates are measured in a subprocess on the target's ``num-cores`` threads (default: all
    cores), as a bundle runs kernels on a stream with the whole budget. A database measured on
    another thread count has its records timed again first (``remeasure_database``).
    ``cache_flush`` evicts every argument but the first (weights, not the input) from the CPU caches
    before each timed run, as the other tenants' kernels do in a bundle; its latencies are not
    comparable with records measured warm, so a database timed the other way is timed again first.
    ``start_from`` is a database tuned for another CPU that an empty ``work_dir`` starts from
    (``start_database``). ``kernels`` tunes only the workloads they name (``select_kernels``).
    """
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if trials_per_task < 1:
        raise CoschedError(f"trials_per_task must be at least 1, not {trials_per_task}")
    start = time.monotonic()
    path = Path(work_dir)
    meta = _prepare_work_dir(path, target, cache_flush, start_from)
    remeasured = 0
    if database is None:
        remeasured = remeasure_database(path, target, cache_flush)
        meta = _read_meta(path)
    elif not _timed_as(meta, _num_cores(target), cache_flush):
        raise CoschedError(
            f"the database at {path} was measured on {meta.get('threads')} threads, cache flush "
            f"{bool(meta.get('cache_flush', False))}, not {_num_cores(target)} threads, cache flush {cache_flush}",
            hint="call remeasure_database before opening it, or let tune_modules open it",
        )
    tasks = extract_tasks(mods, target, names)
    tasks.sort(key=lambda t: t.cost, reverse=True)
    chosen = {t.key for t in select_kernels(tasks, kernels)}
    db = open_database(path) if database is None else database
    on_disk = _records_per_workload(db, tasks)
    done = {t.key: max(on_disk[t.key], int(meta["trials"].get(t.key, 0))) for t in tasks}
    # Injective kernels get cosched's own schedules measured once, also in a database tuned before
    # they existed: their trials come on top of the task's.
    injective = {t.key: s for t in tasks if t.key not in meta["injective"] and (s := injective_candidates(t.mod))}
    todo = [t for t in tasks if t.key in chosen and (done[t.key] < trials_per_task or t.key in injective)]
    best = {t.key: _best_us(db, t) for t in todo}
    # FLOPs say little about time once a kernel is tuned (a depthwise conv has few and still takes
    # long): a measured kernel ranks by the time it takes per inference, after every unmeasured one.
    todo.sort(key=lambda t: (0, -t.cost) if best[t.key] is None else (1, -t.weight * best[t.key]))
    families: dict[str, list[TaskInfo]] = {}
    for t in tasks if transfer else []:
        families.setdefault(family(t), []).append(t)
    plan = _Plan(path, meta, db, done, todo, patience, min_gain, search, families, cache_flush, injective)
    report = TuneReport(
        tasks_total=sum(len(t.users) for t in tasks),
        tasks_deduped=len(tasks),
        trials_run=0,
        seconds=0.0,
        tasks_skipped=len(tasks) - len(plan.todo),
        records_remeasured=remeasured,
        work_dir=str(path),
    )
    if plan.todo:
        bar = _ProgressBar(len(tasks), report.tasks_skipped, time_budget_s, start, progress)
        try:
            _tune_plan(plan, target, trials_per_task, report, bar, start, time_budget_s, max_tasks, seed)
        finally:
            bar.close()
            report.trials_run = bar.trials
    report.seconds = time.monotonic() - start
    report.best_us = {t.name: us for t in tasks if (us := _best_us(db, t)) is not None}
    logger.info(
        "tuned %d tasks (%d trials) in %.0f s; %d stopped early (%d trials saved), %d already done, "
        "%d left for lack of time",
        report.tasks_tuned,
        report.trials_run,
        report.seconds,
        report.tasks_stopped_early,
        report.trials_saved,
        report.tasks_skipped,
        report.tasks_left,
    )
    return report


@dataclass
class _Plan:
    """The state of one ``tune_modules`` run."""

    path: Path
    meta: dict
    db: ms.database.Database
    done: dict[str, int]
    """Trials each workload had before this run, by ``TaskInfo.key``."""
    todo: list[TaskInfo]
    """Tasks still short of trials: unmeasured ones costliest first, then by measured time per inference."""
    patience: int | None
    min_gain: float
    search: SearchSize
    families: dict[str, list[TaskInfo]] = field(default_factory=dict)
    """All tasks by :func:`family`, for transfer; empty: no transfer."""
    cache_flush: bool = False
    injective: dict[str, list[tvm.s_tir.Schedule]] = field(default_factory=dict)
    """Tasks whose ``injective_candidates`` are still to be measured, with them."""

    def donors(self, task: TaskInfo, most: int) -> list:
        """Best traces of up to ``most`` other workloads of the task's family, closest in work first."""
        others = sorted(
            (t for t in self.families.get(family(task), []) if t.key != task.key),
            key=lambda t: abs(math.log(max(t.flops, 1.0)) - math.log(max(task.flops, 1.0))),
        )
        traces = []
        for other in others:
            if len(traces) == most:
                break
            if (best := _best_record(self.db, other)) is not None:
                traces.append(best.trace)
        return traces


def _tune_plan(
    plan: _Plan,
    target: tvm.target.Target,
    trials_per_task: int,
    report: TuneReport,
    bar: _ProgressBar,
    start: float,
    time_budget_s: float | None,
    max_tasks: int | None,
    seed: int | None,
) -> None:
    """Tune ``plan.todo`` in order until done or out of budget; counts go into ``report``."""
    cores = _num_cores(target)
    builder = _PooledBuilder(max_workers=cores)
    runner = _local_runner(cores, plan.cache_flush)
    # One cost model for all tasks. It predicts at random until it has seen num_warmup_samples
    # measurements; MetaSchedule's 100 would leave the first dozen tasks to chance here.
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=cores, num_warmup_samples=min(100, 4 * trials_per_task))
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _Progress(bar.on_batch)]
    seeds = ms.utils.fork_seed(seed, n=len(plan.todo))
    task_secs: list[float] = []
    try:
        with _cpu_intrinsics_only(target):
            for i, task in enumerate(plan.todo):
                if _out_of_budget(start, time_budget_s, task_secs) or report.tasks_tuned == max_tasks:
                    report.tasks_left = len(plan.todo) - i
                    break
                best = _best_us(plan.db, task)
                bar.start_task(task, best)
                t0 = time.monotonic()
                own = plan.injective.get(task.key, [])
                trials = max(0, trials_per_task - plan.done[task.key]) + len(own)
                patience = depth_patience(plan.patience, plan.done[task.key])
                early = patience is not None and patience < trials
                batch = max(1, patience // 2) if early else min(trials, 64)
                strategy, outcome = plan.search.strategy(batch), {}
                # A workload new to the database starts from its tuned relatives' best schedules.
                donors = plan.donors(task, max(1, trials // 2)) if plan.done[task.key] == 0 else []
                if early or donors or own:
                    strategy = _Guided(strategy, patience if early else None, plan.min_gain, best, outcome, donors, own)
                ctx = ms.TuneContext(
                    mod=task.mod,
                    target=target,
                    space_generator="post-order-apply",
                    search_strategy=strategy,
                    task_name=task.name,
                    rand_state=seeds[i],
                    num_threads=cores,
                ).clone()
                _run_task(ctx, task.weight, trials, batch, builder, runner, plan.db, cost_model, callbacks)
                task_secs.append(time.monotonic() - t0)
                report.tasks_tuned += 1
                report.tuned.append(task.name)
                if outcome.get("stopped"):
                    report.tasks_stopped_early += 1
                    report.trials_saved += trials - outcome["measured"]
                report.trials_transferred += outcome.get("transferred", 0)
                report.trials_injective += outcome.get("injective", 0)
                # The records are on disk already; this marks the task complete for a rerun. A
                # search that ran out of new candidates early is complete too.
                plan.meta["trials"][task.key] = max(trials_per_task, plan.done[task.key])
                if own:
                    plan.meta["injective"].append(task.key)
                _write_meta(plan.path, plan.meta)
                bar.task_done()
    finally:
        builder.shutdown()
        runner.pool.shutdown()


def _out_of_budget(start: float, budget_s: float | None, task_secs: list[float]) -> bool:
    if budget_s is None:
        return False
    expected = sum(task_secs) / len(task_secs) if task_secs else 0.0
    return time.monotonic() - start + expected > budget_s


def _run_task(
    ctx: ms.TuneContext,
    weight: int,
    trials: int,
    batch: int,
    builder: ms.builder.Builder,
    runner: ms.runner.Runner,
    db: ms.database.Database,
    cost_model: ms.cost_model.CostModel,
    callbacks: list[ms.measure_callback.MeasureCallback],
) -> None:
    """Give one task up to ``trials`` more measurements, ``batch`` at a time; records go to ``db`` as measured."""
    # One task per scheduler run: the order and the budget stay ours, and a task's records are
    # complete when it returns.
    scheduler = ms.task_scheduler.TaskScheduler.create("round-robin")
    scheduler.tune(
        tasks=[ctx],
        task_weights=[float(weight)],
        max_trials_global=trials,
        max_trials_per_task=trials,
        num_trials_per_iter=batch,
        builder=builder,
        runner=runner,
        measure_callbacks=callbacks,
        database=db,
        cost_model=cost_model,
    )


__all__ = [
    "MIN_GAIN",
    "SearchSize",
    "TaskInfo",
    "TuneReport",
    "check_database",
    "compact_database",
    "depth_patience",
    "early_stop_step",
    "extract_tasks",
    "open_database",
    "trial_ladder",
    "tune",
    "tune_modules",
]


def trial_ladder(first: int, trials: int) -> list[int]:
    """Trials per workload of each pass of ``tune``: ``first``, four times as many, ..., ``trials``."""
    steps = [max(1, min(first, trials))]
    while steps[-1] * 4 < trials:
        steps.append(steps[-1] * 4)
    return steps if steps[-1] == trials else [*steps, trials]


def tune(
    tenants,
    target: tvm.target.Target | str | dict | None = None,
    work_dir: str | os.PathLike = "cosched_db",
    trials: int = 8,
    time_budget: float | None = None,
    *,
    first_trials: int = 2,
    names: Sequence[str] | None = None,
    progress: bool = True,
    patience: int | None = 16,
    transfer: bool = False,
    search: SearchSize = SearchSize(),
    prune: bool = False,
    cache_flush: bool = False,
    max_tasks: int | None = None,
    start_from: str | os.PathLike | None = None,
    kernels: Sequence[str] | None = None,
) -> TuneReport:
    """Tune the kernels of a bundle's tenants into a database that ``cosched.compile(database=...)`` applies.

    Passes within ``time_budget`` seconds: ``first_trials`` for every distinct workload, costliest
    first (an untuned CPU kernel has no parallel loop at all, so coverage pays most), then four
    times as many for every workload, costliest first, and so on up to ``trials`` (``trial_ladder``).
    The first pass stops at 65% of the budget, so some is always left for the costliest. Every pass
    resumes from the database, so an interrupted run loses nothing; the database is compacted to the
    best record per workload.
    A task stops early once ``patience`` trials brought no gain (see ``tune_modules``).
    ``prune`` drops the records of workloads these tenants do not have (``compact_database``).
    ``max_tasks`` caps the workloads each pass tunes (the costliest: a deep pass on a few).
    ``start_from``: a database tuned for another CPU (e.g. ``databases/znver4/demo``) whose records
    an empty ``work_dir`` starts from, timed here again and tuned on (``start_database``).
    ``kernels``: tune only the workloads these patterns name (``select_kernels``), e.g. the few a
    profile shows slower than they should be.
    """
    from .compiler import as_tenants
    from .passes import LowerKernels
    from .target import as_target

    tenants = as_tenants(tenants)
    tgt = as_target(target)
    names = list(names) if names else [t.name for t in tenants]
    mods = [LowerKernels(tgt)(t.mod) for t in tenants]
    tasks = extract_tasks(mods, tgt, names)
    select_kernels(tasks, kernels)  # a typo fails before any timing
    start = time.monotonic()
    # Refuses another target's database before opening it.
    _prepare_work_dir(Path(work_dir), tgt, cache_flush, start_from)
    remeasured = remeasure_database(work_dir, tgt, cache_flush)
    # Opened once for all passes: opening replays every record.
    db = open_database(work_dir)
    before = {t.name: us for t in tasks if (us := _best_us(db, t)) is not None}
    reports = []
    for i, pass_trials in enumerate(trial_ladder(first_trials, trials)):
        share = 0.65 if i == 0 else 1.0
        left = None if time_budget is None else max(0.0, time_budget * share - (time.monotonic() - start))
        report = tune_modules(
            mods,
            tgt,
            work_dir,
            trials_per_task=pass_trials,
            time_budget_s=left,
            names=names,
            progress=progress,
            patience=patience,
            transfer=transfer,
            search=search,
            database=db,
            cache_flush=cache_flush,
            max_tasks=max_tasks,
            kernels=kernels,
        )
        reports.append(report)
    compact_database(work_dir, keep=tasks if prune else None, database=db)
    # The last pass's report describes the database; what was spent adds up over the passes.
    for name in ("trials_run", "tasks_stopped_early", "trials_saved", "trials_transferred", "trials_injective"):
        setattr(report, name, sum(getattr(r, name) for r in reports))
    report.tuned = sorted({name for r in reports for name in r.tuned})
    report.tasks_tuned = len(report.tuned)
    report.best_before_us = {name: before[name] for name in report.tuned if name in before}
    report.records_remeasured = remeasured
    report.seconds = time.monotonic() - start
    return report
