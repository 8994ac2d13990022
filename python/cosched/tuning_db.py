"""A tuning database on disk: its files, the target it was tuned for, compaction, a start from another CPU's.

The database is MetaSchedule's ``JSONDatabase`` (``database_workload.json`` and
``database_tuning_record.json``) plus ``cosched_target.json``, which names the target it was tuned
for, how its records were timed, how many trials each workload has had and which convolutions it
tuned as Winograd. Every file is replaced
by write-then-rename, so a kill never leaves a half-written database.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tvm
from tvm.s_tir import meta_schedule as ms

from .errors import CoschedError
from .target import target_key

if TYPE_CHECKING:
    from .tuning import TaskInfo

logger = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "cosched_target.json"
WINOGRAD_META = "winograd"
"""Key of the meta that holds the ``WinogradRule`` (as JSON) under which every Winograd kernel of the tuned
models has a record: ``LowerKernels`` compiles under this database with that rule, none if absent."""


def read_meta(work_dir: Path) -> dict:
    """``cosched_target.json`` of ``work_dir``; empty when missing or unreadable."""
    try:
        return json.loads((work_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_meta(work_dir: Path, meta: dict) -> None:
    """Replace ``cosched_target.json`` of ``work_dir`` with ``meta``."""
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
    tuned_for = read_meta(path).get("target")
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


def records_per_workload(db: ms.database.Database, tasks: Sequence[TaskInfo]) -> dict[str, int]:
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


def best_record(db: ms.database.Database, task: TaskInfo) -> ms.database.TuningRecord | None:
    """The fastest valid record of the task's workload, if the database has one."""
    # has_workload first: commit_workload would add an unknown workload to the database.
    top = db.get_top_k(db.commit_workload(task.mod), 1) if db.has_workload(task.mod) else []
    return top[0] if top else None


def best_us(db: ms.database.Database, task: TaskInfo) -> float | None:
    """The task's best recorded latency in microseconds, if the database has one."""
    best = best_record(db, task)
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


def install_database(tmp: Path, path: Path) -> None:
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
                if (best := best_record(db, task)) is not None:
                    workload = pruned.commit_workload(task.mod)
                    pruned.commit_tuning_record(
                        ms.database.TuningRecord(best.trace, workload, best.run_secs, best.target, best.args_info)
                    )
            meta = read_meta(path)
            keys = {t.key for t in keep}
            meta["trials"] = {k: n for k, n in meta.get("trials", {}).items() if k in keys}
            meta["injective"] = [k for k in meta.get("injective", []) if k in keys]
            write_meta(path, meta)
        kept = len(pruned.get_all_tuning_records())
        workloads = (Path(tmp) / WORKLOAD_FILE).read_text().splitlines()
        (Path(tmp) / WORKLOAD_FILE).write_text("".join(_minify_workload(w) + "\n" for w in workloads if w))
        install_database(Path(tmp), path)
    return kept


def has_records(path: Path) -> bool:
    """Whether ``path`` holds a non-empty workload or record file."""
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
    tuned_for = read_meta(src).get("target")
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
    write_meta(path, {"target": target_key(target), "trials": {}, "injective": [], "started_from": started})
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        for name in (WORKLOAD_FILE, RECORD_FILE):
            shutil.copyfile(src / name, Path(tmp) / name)
        install_database(Path(tmp), path)
    logger.info("started %s from the records of %s (tuned for %s)", path, src, tuned_for)
    return True
