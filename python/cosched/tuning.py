"""Tune the kernels of several models together with MetaSchedule, into one JSON database.

Models that share a bundle often share kernels (the same conv shape in two nets): such a workload
is tuned once, with the summed weight of its callers. Tasks are tuned one at a time, costliest
first, so a time budget goes where the latency is, and every finished measurement is already on
disk: an interrupted run loses nothing and a rerun resumes where it stopped.

The database on disk is ``cosched.tuning_db``'s; candidates are built and timed by
``cosched.tuning_measure``. Apply a database with::

    with target, ms.database.JSONDatabase(work_dir=work_dir):
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops
from tvm.s_tir.meta_schedule.utils import shash2hex

from .errors import CoschedError
from .injective_schedule import injective_candidates
from .passes.winograd import WINOGRAD_KERNEL, WinogradRule, default_rule
from .target import target_key
from .tuning_db import (
    META_FILE,
    WINOGRAD_META,
    best_record,
    best_us,
    check_database,
    compact_database,
    has_records,
    open_database,
    read_meta,
    records_per_workload,
    start_database,
    write_meta,
)
from .tuning_measure import (
    PooledBuilder,
    cpu_intrinsics_only,
    local_runner,
    mean_us,
    num_cores,
    remeasure_database,
    set_timed_as,
    timed_as,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_GAIN",
    "SearchSize",
    "TaskInfo",
    "TuneReport",
    "depth_patience",
    "early_stop_step",
    "extract_tasks",
    "trial_ladder",
    "tune",
    "tune_modules",
]


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
# Tuning


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Counts trials and tracks the best latency as measurements come in."""

    def __init__(self, on_batch) -> None:
        super().__init__()
        self.on_batch = on_batch

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        measured = [us for res in runner_results if (us := mean_us(res)) is not None]
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
        batch = [us for r in results if (us := mean_us(r)) is not None]
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


def _prepare_work_dir(
    path: Path, target: tvm.target.Target, cache_flush: bool = False, start_from: str | os.PathLike | None = None
) -> dict:
    """Create ``path`` or check that what it holds was tuned for ``target``; returns the meta.

    ``start_from``: a database of another CPU that an empty ``path`` starts from (``start_database``).
    """
    path.mkdir(parents=True, exist_ok=True)
    if start_from is not None:
        start_database(path, start_from, target)
    has_db = has_records(path)
    if has_db or (path / META_FILE).is_file():
        check_database(path, target)  # never mix records of two targets in one directory
    meta = read_meta(path)
    meta["target"] = target_key(target)
    meta.setdefault("trials", {})
    meta.setdefault("injective", [])
    if not has_db:  # how records are timed: remeasure_database compares the next runs' with it
        set_timed_as(meta, num_cores(target), cache_flush)
    write_meta(path, meta)
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
        meta = read_meta(path)
    elif not timed_as(meta, num_cores(target), cache_flush):
        raise CoschedError(
            f"the database at {path} was measured on {meta.get('threads')} threads, cache flush "
            f"{bool(meta.get('cache_flush', False))}, not {num_cores(target)} threads, cache flush {cache_flush}",
            hint="call remeasure_database before opening it, or let tune_modules open it",
        )
    tasks = extract_tasks(mods, target, names)
    tasks.sort(key=lambda t: t.cost, reverse=True)
    chosen = {t.key for t in select_kernels(tasks, kernels)}
    db = open_database(path) if database is None else database
    on_disk = records_per_workload(db, tasks)
    done = {t.key: max(on_disk[t.key], int(meta["trials"].get(t.key, 0))) for t in tasks}
    # Injective kernels get cosched's own schedules measured once, also in a database tuned before
    # they existed: their trials come on top of the task's.
    injective = {t.key: s for t in tasks if t.key not in meta["injective"] and (s := injective_candidates(t.mod))}
    todo = [t for t in tasks if t.key in chosen and (done[t.key] < trials_per_task or t.key in injective)]
    best = {t.key: best_us(db, t) for t in todo}
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
    report.best_us = {t.name: us for t in tasks if (us := best_us(db, t)) is not None}
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


def _record_winograd(path: Path, rule: WinogradRule | None, tasks: Sequence[TaskInfo], tuned: dict[str, float]) -> None:
    """Record ``rule`` in the meta if every Winograd kernel it made has a record; else keep the one there."""
    # LowerKernels compiles under the database with the recorded rule: a database tuned before the
    # Winograd kernels existed, or before a rule that makes new ones, keeps what it has records for.
    untuned = [t.name for t in tasks if WINOGRAD_KERNEL in t.name and t.name not in tuned]
    meta = read_meta(path)
    if untuned:
        logger.warning(
            "%d Winograd kernels are untuned (%s): compiling keeps the convolutions the database was tuned with "
            "(%s) until they are",
            len(untuned),
            ", ".join(untuned[:3]),
            meta.get(WINOGRAD_META) or "direct",
        )
        return
    value = None if rule is None else rule.to_json()
    if meta.get(WINOGRAD_META) != value:
        meta[WINOGRAD_META] = value
        write_meta(path, meta)


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
            if (best := best_record(self.db, other)) is not None:
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
    cores = num_cores(target)
    builder = PooledBuilder(max_workers=cores)
    runner = local_runner(cores, plan.cache_flush)
    # One cost model for all tasks. It predicts at random until it has seen num_warmup_samples
    # measurements; MetaSchedule's 100 would leave the first dozen tasks to chance here.
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=cores, num_warmup_samples=min(100, 4 * trials_per_task))
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _Progress(bar.on_batch)]
    seeds = ms.utils.fork_seed(seed, n=len(plan.todo))
    task_secs: list[float] = []
    try:
        with cpu_intrinsics_only(target):
            for i, task in enumerate(plan.todo):
                if _out_of_budget(start, time_budget_s, task_secs) or report.tasks_tuned == max_tasks:
                    report.tasks_left = len(plan.todo) - i
                    break
                best = best_us(plan.db, task)
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
                write_meta(plan.path, plan.meta)
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
    rule = default_rule(tgt)
    mods = [LowerKernels(tgt, winograd=rule or False)(t.mod) for t in tenants]
    tasks = extract_tasks(mods, tgt, names)
    select_kernels(tasks, kernels)  # a typo fails before any timing
    start = time.monotonic()
    # Refuses another target's database before opening it.
    _prepare_work_dir(Path(work_dir), tgt, cache_flush, start_from)
    remeasured = remeasure_database(work_dir, tgt, cache_flush)
    # Opened once for all passes: opening replays every record.
    db = open_database(work_dir)
    before = {t.name: us for t in tasks if (us := best_us(db, t)) is not None}
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
    _record_winograd(Path(work_dir), rule, tasks, report.best_us)
    report.tuned = sorted({name for r in reports for name in r.tuned})
    report.tasks_tuned = len(report.tuned)
    report.best_before_us = {name: before[name] for name in report.tuned if name in before}
    report.records_remeasured = remeasured
    report.seconds = time.monotonic() - start
    return report
