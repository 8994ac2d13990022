"""Building and timing MetaSchedule candidates the way a bundle runs them: on the target's cores,
warm or with caches flushed, in builder processes that are kept and skip the GPU intrinsics."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder.local_builder import default_export
from tvm.s_tir.meta_schedule.utils import shash2hex
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from .errors import CoschedError
from .tuning_db import RECORD_FILE, install_database, open_database, read_meta, write_meta

logger = logging.getLogger(__name__)

# Records with this run time (or more) are MetaSchedule's marker for a failed build or run.
_FAILED_SECS = 1e9


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
def cpu_intrinsics_only(target: tvm.target.Target) -> Iterator[None]:
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
class PooledBuilder(ms.builder.PyBuilder):
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


def mean_us(result: ms.runner.RunnerResult) -> float | None:
    """A successful measurement's mean latency in microseconds; None for a failed one."""
    if result.error_msg is not None or not result.run_secs:
        return None
    secs = [float(s) for s in result.run_secs]
    mean = sum(secs) / len(secs)
    return mean * 1e6 if mean < _FAILED_SECS else None


def num_cores(target: tvm.target.Target) -> int:
    """The threads a bundle for ``target`` runs kernels on: its ``num-cores``, else every CPU."""
    cores = target.attrs.get("num-cores") if target.attrs else None
    return int(cores) if cores else max(1, os.cpu_count() or 1)


def failed(result: ms.runner.RunnerResult | str) -> bool:
    """Whether a build error (str) or a run without a valid time."""
    return isinstance(result, str) or mean_us(result) is None


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


def runner_on_cores(cores: int, evaluator_config: ms.runner.EvaluatorConfig | None = None) -> ms.runner.LocalRunner:
    """MetaSchedule's local runner, its worker timing every candidate on ``cores`` threads."""
    return ms.runner.LocalRunner(
        evaluator_config=evaluator_config, initializer=functools.partial(_measure_on_threads, cores)
    )


def local_runner(cores: int, cache_flush: bool) -> ms.runner.LocalRunner:
    """The runner tuning times candidates with: on ``cores`` threads, warm or cold (``cold_evaluator``)."""
    return runner_on_cores(cores, cold_evaluator() if cache_flush else None)


def timed_as(meta: dict, cores: int, cache_flush: bool) -> bool:
    """Whether the database's records were timed on ``cores`` threads with caches flushed or not."""
    if meta.get("threads") != cores:
        return False
    if not cache_flush:
        return not meta.get("cache_flush", False)
    # A database tuned with cache_flush before ``cold_evaluator`` was timed warm and is timed again.
    return bool(meta.get("cache_flush")) and meta.get("cold_runs") == COLD_RUNS


def set_timed_as(meta: dict, cores: int, cache_flush: bool) -> None:
    """Record in ``meta`` how the database's records are timed (``timed_as``)."""
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
    builder = PooledBuilder(max_workers=cores)
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
    cores = num_cores(target)
    meta = read_meta(path)
    if timed_as(meta, cores, cache_flush) or not (path / RECORD_FILE).is_file():
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
    (timed,) = time_records(records, target, cores, [local_runner(cores, cache_flush)])
    # A build error (str), a run error, or a run without a valid time.
    failures = [res if isinstance(res, str) else res.error_msg or "no valid time" for res in timed if failed(res)]
    if records and len(failures) == len(records):
        raise CoschedError(
            f"none of the {len(records)} records in {path} could be timed again: {failures[0][:300]}",
            hint="check that this machine can run the target's code; the database was left as it was",
        )
    trials = meta.setdefault("trials", {})
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        fresh = ms.database.JSONDatabase(work_dir=tmp, module_equality="structural")
        for rec, res in zip(records, timed, strict=True):
            if failed(res):
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
        install_database(Path(tmp), path)
    set_timed_as(meta, cores, cache_flush)
    write_meta(path, meta)
    return len(records)
