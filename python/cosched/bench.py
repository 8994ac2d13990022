"""The measurement core of ``cosched bench``: baselines, alternating timing, tables.

A *contender* is one way of running the same set of models on the same inputs: the Relax VM one
model after another, one VM per model in concurrent threads, ONNX Runtime either way, or a cosched
bundle (built elsewhere, it only has to fill in a :class:`Contender`). :func:`measure` times all
contenders in alternating rounds so that slow drift of the machine (thermal state, a neighbour's
job) hits every contender alike, and reports medians with their spread.

Threads. Every contender runs its work on *persistent* worker threads owned by this module, never
on the caller's thread, for two reasons measured on TVM 0.27:

* TVM's CPU thread pool is per calling thread. ``runtime.config_threadpool(1, n)`` sizes the
  calling thread's pool, but only up to ``TVM_NUM_THREADS`` (default: half the cores, 1 on a
  2-core machine), and that cap must stay in the environment while kernels run. We raise it to the
  largest pool asked for (and leave it), then each worker thread configures its own pool: a
  sequential contender's worker gets all ``threads``, each concurrent worker its share, whatever
  pool the caller's thread happens to have.
* ``TVM_BIND_THREADS=0`` must be in the environment before *any* TVM pool is created in the
  process (it is read when a pool configures its affinity): otherwise TVM pins the creating thread
  to core 0, threads created later inherit that, and concurrent contenders get no concurrency.
  This module sets it (``setdefault``) on import, which is early enough as long as nothing ran a
  parallel TVM kernel before; tests and the CLI should set it before importing tvm at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# Must precede the creation of any TVM thread pool (see the module docstring).
os.environ.setdefault("TVM_BIND_THREADS", "0")

import numpy as np
import onnx
import scipy.stats
import tvm
from tvm import relax

from .errors import CoschedError
from .tenant import Tenant

__all__ = [
    "Contender",
    "Result",
    "Speedup",
    "compile_tenant",
    "format_table",
    "header",
    "measure",
    "ort_concurrent",
    "ort_sequential",
    "relax_vm_concurrent",
    "relax_vm_sequential",
    "speedup",
    "split_threads",
    "to_json",
]

Inputs = dict[str, dict[str, np.ndarray]]
"""Tenant name -> input name -> array: the one set of inputs every contender is fed."""
Outputs = dict[str, list[np.ndarray]]
"""Tenant name -> that tenant's outputs in order."""

# The CPUs this process may use, read before TVM had a chance to pin the main thread.
_PROCESS_CPUS: frozenset[int] = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
# Workers configuring their TVM pools raise TVM_NUM_THREADS: one at a time.
_ENV_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Contenders and results
# --------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One way of running all tenants once.

    ``run`` runs every tenant once and returns when all are done. ``memory_bytes`` is what the
    contender costs in memory, by ``memory_source``: ``"rss-growth"`` (measured growth of the
    process's peak RSS over setup + first run) or ``"planned"`` (bytes a cosched plan allocates).
    ``outputs``, when given, returns the outputs of the latest run as numpy arrays; it exists so
    that tests and ``cosched bench --check`` can compare contenders (use :meth:`run_once`).
    """

    name: str
    run: Callable[[], None]
    memory_bytes: int | None = None
    close: Callable[[], None] | None = None
    outputs: Callable[[], Outputs] | None = None
    memory_source: str = "rss-growth"

    def run_once(self) -> Outputs:
        """Run once and return every tenant's outputs (copied to numpy)."""
        if self.outputs is None:
            raise CoschedError(f"contender {self.name!r} does not expose its outputs")
        self.run()
        return self.outputs()


@dataclass
class Result:
    """Timing of one contender; times are per run of all tenants, in milliseconds."""

    name: str
    median_ms: float
    p25: float
    p75: float
    memory_bytes: int | None = None
    min_ms: float = float("nan")
    repeat: int = 0
    memory_source: str = "rss-growth"
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def iqr_ms(self) -> float:
        return self.p75 - self.p25

    @classmethod
    def from_samples(
        cls, name: str, samples_ms: list[float], memory_bytes: int | None = None, memory_source: str = "rss-growth"
    ) -> Result:
        """Median, quartiles and minimum of the samples (one per round, in round order)."""
        q = _quartiles(samples_ms)
        return cls(name, q[1], q[0], q[2], memory_bytes, min(samples_ms), len(samples_ms), memory_source, samples_ms)


@dataclass(frozen=True)
class Speedup:
    """How many times faster one contender ran than another, with a confidence interval."""

    value: float
    """The baseline's median time over this contender's (> 1: this one is faster)."""
    low: float = float("nan")
    high: float = float("nan")

    @property
    def interval(self) -> tuple[float, float] | None:
        """``(low, high)``, or None where there were too few samples for one."""
        return None if np.isnan(self.low) else (self.low, self.high)

    def __str__(self) -> str:
        return format(self, "")

    def __format__(self, spec: str) -> str:
        """``"1.09 [1.02-1.15]"``; spec ``x`` writes ``"1.09x [1.02-1.15]"``, anything else aligns the text."""
        unit = "x" if spec == "x" else ""
        text = f"{self.value:.2f}{unit}"
        if self.interval is not None:
            text += f" [{self.low:.2f}-{self.high:.2f}]"
        return text if spec in ("", "x") else format(text, spec)


def speedup(base: Result, this: Result, confidence: float = 0.95, seed: int = 0) -> Speedup:
    """``base`` median over ``this`` median, with a bootstrap interval over the measurement rounds.

    :func:`measure` runs every contender once per round, so two results of one call are resampled
    by round, in pairs: a slow round (a neighbour's job) slows both samples it holds and largely
    cancels in the ratio. Results of different calls (unequal counts) are resampled independently.
    Without at least three samples each there is no interval (``low``, ``high`` are NaN).
    """
    value = base.median_ms / this.median_ms if this.median_ms > 0 else float("inf")
    b, t = np.asarray(base.samples_ms, dtype=float), np.asarray(this.samples_ms, dtype=float)
    if min(len(b), len(t)) < 3 or not np.isfinite(value):
        return Speedup(value)
    if base is this:
        return Speedup(value, value, value)

    def ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.median(x, axis=axis) / np.median(y, axis=axis)

    ci = scipy.stats.bootstrap(
        (b, t),
        ratio,
        paired=len(b) == len(t),
        vectorized=True,
        n_resamples=2000,
        confidence_level=confidence,
        method="percentile",  # BCa returns NaN for degenerate (constant) samples
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return Speedup(value, float(ci.low), float(ci.high))


# --------------------------------------------------------------------------------------------
# Persistent worker threads
# --------------------------------------------------------------------------------------------


def _configure_tvm_pool(nthreads: int) -> int:
    """Give the calling thread's TVM pool ``nthreads`` workers and check that it has them."""
    # A thread inherits its creator's affinity; undo a pin TVM may have put on the creator.
    if _PROCESS_CPUS and hasattr(os, "sched_setaffinity") and set(os.sched_getaffinity(0)) != _PROCESS_CPUS:
        os.sched_setaffinity(0, _PROCESS_CPUS)
    with _ENV_LOCK:
        # TVM caps every pool at TVM_NUM_THREADS (else half the cores), and measured in 0.27 the
        # cap is read again when kernels run, not only when the pool is made: a pool configured
        # to 2 under TVM_NUM_THREADS=2 runs on one thread once the variable is gone. So it is
        # raised to the largest size asked for and left set (process-wide). This happens during
        # setup only, while no worker of ours runs kernels: setenv is not safe against getenv.
        current = os.environ.get("TVM_NUM_THREADS", "")
        if not current.isdigit() or int(current) < nthreads:
            os.environ["TVM_NUM_THREADS"] = str(nthreads)
    # Mode 1 (kBig): all cores on a homogeneous CPU; nothing is pinned with TVM_BIND_THREADS=0.
    # config_threadpool sizes the *calling* thread's pool only, up to the cap above.
    tvm.get_global_func("runtime.config_threadpool")(1, nthreads)
    got = int(tvm.runtime.num_threads())
    if got != nthreads:
        raise CoschedError(
            f"TVM thread pool has {got} threads, asked for {nthreads}",
            hint="set TVM_NUM_THREADS to at least the thread count, or leave it unset",
        )
    return got


class _Worker:
    """One persistent thread that runs jobs handed to it; with ``tvm_threads`` it owns a TVM pool
    of that size. Persistent so that a timed run pays a hand-off, never a thread start."""

    def __init__(self, name: str, tvm_threads: int | None = None):
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cosched-bench-{name}")
        self.tvm_threads = self.call(_configure_tvm_pool, tvm_threads) if tvm_threads else None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def split_threads(threads: int, parts: int) -> list[int]:
    """Share ``threads`` cores among ``parts`` concurrent workers as evenly as possible, each >= 1
    (so with fewer cores than parts the cores are oversubscribed rather than a tenant starved)."""
    if threads < 1 or parts < 1:
        raise CoschedError(f"cannot split {threads} threads into {parts} parts", hint="use threads >= 1")
    base, extra = divmod(threads, parts)
    return [max(1, base + (1 if i < extra else 0)) for i in range(parts)]


# --------------------------------------------------------------------------------------------
# Memory: growth of the process's peak RSS over a window
# --------------------------------------------------------------------------------------------


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _RssWindow:
    """Peak RSS growth of this process between :meth:`start` and :meth:`stop` (then ``bytes``).

    An approximation, and labelled as one: the VM does not expose its planned storage, so we
    measure what the process actually gained. Before the window, garbage is collected and glibc
    gives freed heap back to the OS (``malloc_trim``), so that allocations in the window are not
    served from memory an earlier step (e.g. the compiler) freed without the RSS showing it. The
    peak comes from ``VmHWM``, reset through ``/proc/self/clear_refs``; where that is not allowed,
    the RSS at the end of the window is used instead. Other threads of the process (idle during
    setup) are counted too.
    """

    def start(self) -> None:
        import psutil

        self._proc = psutil.Process()
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # 5: reset the peak RSS to the current RSS
            self._peak = True
        except OSError:
            self._peak = False
        self._start = self._proc.memory_info().rss
        self.bytes = 0

    def stop(self) -> None:
        end = self._proc.memory_info().rss
        hwm = _vm_hwm_bytes() if self._peak else None
        self.bytes = max(0, (hwm if hwm is not None else end) - self._start)


_WARMED: set[str] = set()


def _warm_once(kind: str, setup: Callable[[], Any]) -> None:
    """Run ``setup`` (and drop what it built) once per process and runtime kind, outside any
    memory window: a runtime's one-time initialisation (measured: ~6 MB for the first Relax VM,
    ~10 MB for the first ONNX Runtime session) would otherwise be charged to whichever contender
    happens to be built first."""
    if kind in _WARMED:
        return
    worker = _Worker(f"warm-{kind}")
    try:
        worker.call(lambda: (setup(), None)[1])
    finally:
        worker.close()
    _WARMED.add(kind)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _check_inputs(
    names: Sequence[str], inputs: Inputs, specs: dict[str, list[tuple[str, tuple, str]]] | None = None
) -> None:
    missing = [n for n in names if n not in inputs]
    if missing:
        raise CoschedError(f"no inputs given for tenants {missing}", hint=f"inputs has {sorted(inputs)}")
    for tenant, tenant_specs in (specs or {}).items():
        for name, shape, dtype in tenant_specs:
            if name not in inputs[tenant]:
                raise CoschedError(f"input {name!r} missing", tenant=tenant, hint=f"given: {sorted(inputs[tenant])}")
            arr = np.asarray(inputs[tenant][name])
            if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != dtype:
                raise CoschedError(
                    f"input {name!r} is {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}", tenant=tenant
                )


def _numpy_outputs(value: Any) -> list[np.ndarray]:
    """Flatten what a VM function returned (a tensor or nested tuples of them) to numpy arrays."""
    if isinstance(value, (tvm.runtime.Tensor,)):
        return [value.numpy()]
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__"):
        out: list[np.ndarray] = []
        for item in value:
            out.extend(_numpy_outputs(item))
        return out
    return [np.asarray(value)]


# --------------------------------------------------------------------------------------------
# Relax VM baselines
# --------------------------------------------------------------------------------------------


def compile_tenant(tenant: Tenant, target: tvm.target.Target, database: str | Path | None = None) -> relax.VMExecutable:
    """Build one tenant alone for the Relax VM: the same lowering and tuned schedules as a bundle."""
    from .reference import compile_alone

    return compile_alone(tenant, target, database)


def _export(ex: relax.VMExecutable, tmp: str, name: str) -> str:
    """Export the executable to a shared library, which a deployment would load."""
    path = os.path.join(tmp, f"{name}.so")
    ex.export_library(path)
    return path


class _VmTenant:
    """One tenant's VM, created on and only ever called from one worker thread (a VM shared by
    two threads crashes in 0.27)."""

    def __init__(self, tenant: Tenant, exe: Any, arrays: dict[str, np.ndarray]):
        dev = tvm.cpu()
        self.name = tenant.name
        self.vm = relax.VirtualMachine(exe, dev)
        self.main = self.vm["main"]  # looked up once: a lookup per run would be timed too
        self.args = [tvm.runtime.tensor(np.ascontiguousarray(arrays[s.name]), dev) for s in tenant.inputs]
        self.last: Any = None

    def __call__(self) -> None:
        self.last = self.main(*self.args)


def _prepare_vm_exes(
    tenants: Sequence[Tenant],
    target: tvm.target.Target,
    database: str | Path | None,
    executables: dict[str, relax.VMExecutable] | None,
) -> dict[str, relax.VMExecutable]:
    exes = dict(executables or {})
    for t in tenants:
        if t.name not in exes:
            exes[t.name] = compile_tenant(t, target, database)
    return exes


def _vm_contender(
    name: str,
    tenants: Sequence[Tenant],
    inputs: Inputs,
    target: tvm.target.Target,
    shares: list[int],
    database: str | Path | None,
    measure_memory: bool,
    executables: dict[str, relax.VMExecutable] | None,
) -> Contender:
    """Shared by both VM baselines: ``shares`` has one entry per worker thread; with one entry
    every tenant runs on that worker in order, otherwise tenant i runs on worker i."""
    if not tenants:
        raise CoschedError("no tenants to benchmark")
    _check_inputs(
        [t.name for t in tenants], inputs, {t.name: [(s.name, s.shape, s.dtype) for s in t.inputs] for t in tenants}
    )
    # Compilation happens outside the memory window: the compiler's heap is no part of the cost.
    exes = _prepare_vm_exes(tenants, target, database, executables)
    workers: list[_Worker] = []
    window = _RssWindow() if measure_memory else None
    try:
        with tempfile.TemporaryDirectory(prefix="cosched-bench-") as tmp:
            # With memory measured, the VMs run the exported libraries, loaded inside the window:
            # code + weights + VM + activations are then what a deployment pays, without the
            # compiler's leftovers. Exporting (g++, Python imports) stays outside the window.
            libs = {t.name: _export(exes[t.name], tmp, t.name) for t in tenants} if measure_memory else {}
            if window is not None:
                # Warm on a copy: the loader would map the same file once only, and the library
                # stays mapped, so the contender's own load would then look free.
                first = tenants[0]
                warm_lib = shutil.copy(libs[first.name], os.path.join(tmp, "warm.so"))
                _warm_once(
                    "relax-vm", lambda: _VmTenant(first, tvm.runtime.load_module(warm_lib), inputs[first.name])()
                )
                window.start()
            workers = [_Worker(f"{name}-{i}", tvm_threads=n) for i, n in enumerate(shares)]
            owner = [workers[0]] * len(tenants) if len(workers) == 1 else workers
            vms: list[_VmTenant] = []
            for t, w in zip(tenants, owner, strict=True):
                exe = tvm.runtime.load_module(libs[t.name]) if measure_memory else exes[t.name]
                vms.append(w.call(_VmTenant, t, exe, inputs[t.name]))
            run = _make_run(workers, owner, vms)
            run()  # first run: allocates the VM's storage, inside the window
            if window is not None:
                window.stop()
    except BaseException:
        for w in workers:
            w.close()
        raise

    def outputs() -> Outputs:
        return {vm.name: _numpy_outputs(vm.last) for vm in vms}

    def close() -> None:
        for w in workers:
            w.close()
        vms.clear()

    return Contender(name, run, window.bytes if window is not None else None, close, outputs)


def _make_run(workers: list[_Worker], owner: list[_Worker], jobs: list[Callable[[], None]]) -> Callable[[], None]:
    """A run: one worker does every job in order, or each worker does its own job, all started
    together and joined."""
    if len(workers) == 1:
        worker = workers[0]

        def sequential() -> None:
            for job in jobs:
                job()

        return lambda: worker.call(sequential)

    def concurrent() -> None:
        futures = [w.submit(job) for w, job in zip(owner, jobs, strict=True)]
        for f in futures:
            f.result()

    return concurrent


def relax_vm_sequential(
    tenants: Sequence[Tenant],
    inputs: Inputs,
    target: tvm.target.Target,
    threads: int,
    database: str | Path | None = None,
    *,
    measure_memory: bool = True,
    executables: dict[str, relax.VMExecutable] | None = None,
    name: str = "relax-vm-seq",
) -> Contender:
    """Each tenant compiled alone, one VM each, run one after another on one thread whose TVM
    pool has ``threads`` workers. ``executables`` (tenant name -> compiled) skips compiling."""
    return _vm_contender(name, list(tenants), inputs, target, [threads], database, measure_memory, executables)


def relax_vm_concurrent(
    tenants: Sequence[Tenant],
    inputs: Inputs,
    target: tvm.target.Target,
    threads: int,
    database: str | Path | None = None,
    *,
    measure_memory: bool = True,
    executables: dict[str, relax.VMExecutable] | None = None,
    name: str = "relax-vm-concurrent",
) -> Contender:
    """One VM per tenant, each on its own persistent thread with its share of the ``threads``
    cores as TVM pool size (see :func:`split_threads`); a run starts all together and joins."""
    tenants = list(tenants)
    # With one tenant this is one worker, which _vm_contender runs "in order": the same thing.
    shares = split_threads(threads, max(1, len(tenants)))
    return _vm_contender(name, tenants, inputs, target, shares, database, measure_memory, executables)


# --------------------------------------------------------------------------------------------
# ONNX Runtime baselines
# --------------------------------------------------------------------------------------------


class _OrtTenant:
    def __init__(
        self, name: str, model_bytes: bytes, feeds: dict[str, np.ndarray], intra_op: int, spinning: bool | None
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.name = name
        self.session = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        known = {i.name for i in self.session.get_inputs()}
        self.feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in known}
        missing = known - set(self.feeds)
        if missing:
            raise CoschedError(f"inputs {sorted(missing)} missing", tenant=name)
        self.last: list[np.ndarray] = []

    def __call__(self) -> None:
        self.last = self.session.run(None, self.feeds)


def _tiny_onnx() -> bytes:
    """y = x: enough to initialise ONNX Runtime's environment."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "warm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def _ort_contender(
    name: str,
    models: dict[str, onnx.ModelProto],
    inputs: Inputs,
    shares: list[int],
    measure_memory: bool,
    spinning: bool | None,
) -> Contender:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise CoschedError("onnxruntime is not installed", hint="pip install onnxruntime (or cosched[bench])") from None
    if not models:
        raise CoschedError("no models to benchmark")
    _check_inputs(list(models), inputs)
    # Serialized outside the window: the proto is the caller's, the session's copy is the cost.
    blobs = {k: m.SerializeToString() for k, m in models.items()}
    workers: list[_Worker] = []
    window = _RssWindow() if measure_memory else None
    try:
        if window is not None:
            _warm_once(
                "onnxruntime", lambda: _OrtTenant("warm", _tiny_onnx(), {"x": np.zeros(1, "float32")}, 1, None)()
            )
            window.start()
        # ORT has its own intra-op pool per session; our threads only carry the calls.
        workers = [_Worker(f"{name}-{i}") for i in range(len(shares))]
        owner = [workers[0]] * len(models) if len(workers) == 1 else workers
        intra = [shares[0]] * len(models) if len(shares) == 1 else shares
        sessions = [
            w.call(_OrtTenant, k, blobs[k], inputs[k], n, spinning)
            for (k, w, n) in zip(models, owner, intra, strict=True)
        ]
        run = _make_run(workers, owner, sessions)
        run()
        if window is not None:
            window.stop()
    except BaseException:
        for w in workers:
            w.close()
        raise

    def outputs() -> Outputs:
        return {s.name: [np.asarray(a) for a in s.last] for s in sessions}

    def close() -> None:
        for w in workers:
            w.close()
        sessions.clear()

    return Contender(name, run, window.bytes if window is not None else None, close, outputs)


def ort_sequential(
    models: dict[str, onnx.ModelProto],
    inputs: Inputs,
    threads: int,
    *,
    measure_memory: bool = True,
    spinning: bool | None = None,
    name: str = "ort-seq",
) -> Contender:
    """One ONNX Runtime session per model (CPU, ``intra_op_num_threads=threads``), run in order.

    ``spinning`` sets ``session.intra_op.allow_spinning`` (None: ONNX Runtime's default, on)."""
    return _ort_contender(name, dict(models), inputs, [threads], measure_memory, spinning)


def ort_concurrent(
    models: dict[str, onnx.ModelProto],
    inputs: Inputs,
    threads: int,
    *,
    measure_memory: bool = True,
    spinning: bool | None = None,
    name: str = "ort-concurrent",
) -> Contender:
    """One session per model on its own persistent thread, ``intra_op_num_threads`` = its share
    of ``threads`` (>= 1); a run starts all together and joins. With more threads per session
    than cores the sessions oversubscribe the machine (measured 0.8x of sequential)."""
    models = dict(models)
    # With one model this is one worker, which _ort_contender runs "in order": the same thing.
    shares = split_threads(threads, max(1, len(models)))
    return _ort_contender(name, models, inputs, shares, measure_memory, spinning)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def closing(contenders: Iterable[Contender]) -> Iterator[None]:
    """Close every contender (worker threads, sessions) when the block ends, also on an error."""
    try:
        yield
    finally:
        for c in contenders:
            if c.close is not None:
                c.close()


QUIET_SHARE = 0.1
"""``settle``'s idea of idle: the process used at most this share of one core over a window."""


def settle(min_s: float, max_s: float = 1.0, window_s: float = 0.02) -> float:
    """Sleep at least ``min_s``, then until this process used at most ``QUIET_SHARE`` of a core over
    ``window_s`` (or ``max_s`` passed); returns the seconds slept.

    A fixed pause is too short after some runs and wasted after others: after one run of each, 18
    bundles of the demo mix in one process (a search holds that many) kept both cores busy for 8 s,
    their pools' workers yielding to one another, and one bundle's pools went idle 0.2-0.45 s after
    its run, depending on its streams.
    """
    start = time.perf_counter()
    time.sleep(min_s)
    last = time.process_time()  # every thread of the process
    while time.perf_counter() - start < max_s:
        time.sleep(window_s)
        now = time.process_time()
        if now - last <= QUIET_SHARE * window_s:
            break
        last = now
    return time.perf_counter() - start


def measure(
    contenders: Sequence[Contender],
    repeat: int = 20,
    warmup: int = 3,
    *,
    number: int = 1,
    shuffle: bool = True,
    settle_s: float = 0.25,
    quiet: bool = True,
    seed: int = 0,
) -> list[Result]:
    """Time every contender ``repeat`` times, alternating: one run of each per round.

    Each round runs every contender once (``number`` back-to-back runs, averaged into one sample),
    so drift of the machine spreads over all contenders instead of biasing whichever ran last.
    With ``shuffle`` every round runs them in a new (seeded) random order, so no contender always
    follows the same neighbour: a contender's leftovers (a spinning pool, evicted caches) would
    otherwise slow the same other contender every round, a bias no number of rounds averages out.
    (Rotating the opener keeps the cyclic order, and with it the neighbours.) Before each run the
    machine is left idle for at least ``settle_s`` and until this process's threads are (``settle``):
    thread pools busy-wait after a run, and measured here a TVM pool worker burns a core for about
    200 ms after the last parallel kernel (``TVM_THREAD_POOL_SPIN_COUNT``), a bundle with three
    streams up to 450 ms, an ONNX Runtime intra-op pool about 50 ms, which would slow down
    whichever contender runs next. ``quiet=False``: a fixed pause of ``settle_s`` (cosched's
    measurements before 2026-11-24; ``benchmarks/settle_ab.py`` compares the two). (Spinning
    *within* a contender, e.g. one session's pool while the next session runs, is that
    contender's real cost and stays in.) Warm-up rounds are not recorded. Results are in the
    order of ``contenders``.
    """
    if not contenders:
        raise CoschedError("no contenders to measure")
    if repeat < 1 or number < 1 or warmup < 0:
        raise CoschedError(f"invalid repeat={repeat}, number={number}, warmup={warmup}", hint="repeat, number >= 1")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise CoschedError(f"contender names repeat: {names}", hint="give every contender its own name")
    samples: list[list[float]] = [[] for _ in contenders]
    rng = random.Random(seed)
    order = list(range(len(contenders)))
    for round_ in range(warmup + repeat):
        if shuffle:
            last = order[-1]
            rng.shuffle(order)
            if len(order) > 1 and order[0] == last:  # never one contender twice in a row
                order[0], order[-1] = order[-1], order[0]
        for i in order:
            if settle_s > 0 and quiet:
                settle(settle_s)
            elif settle_s > 0:
                time.sleep(settle_s)
            run = contenders[i].run
            t0 = time.perf_counter_ns()
            for _ in range(number):
                run()
            elapsed_ms = (time.perf_counter_ns() - t0) / 1e6 / number
            if round_ >= warmup:
                samples[i].append(elapsed_ms)
    return [
        Result.from_samples(c.name, s, c.memory_bytes, c.memory_source)
        for c, s in zip(contenders, samples, strict=True)
    ]


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where it does not say."""
    cores: set[tuple[str, str]] = set()
    package = core = None
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    package = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((package or "0", core))
                    package = core = None
    except OSError:
        return None
    if core is not None:
        cores.add((package or "0", core))
    return len(cores) or None


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except ImportError:
        return "not installed"


def header(threads: int | None = None, target: tvm.target.Target | None = None) -> str:
    """What a reader needs to judge the numbers: machine, threads, versions, date."""
    usable = len(_PROCESS_CPUS) if _PROCESS_CPUS else None
    lines = [
        f"machine : {_cpu_model()}; {_physical_cores() or '?'} physical cores, os.cpu_count()={os.cpu_count()}"
        + (f", usable by this process={usable}" if usable is not None else ""),
        (
            f"threads : {threads if threads is not None else '?'} "
            f"(TVM_BIND_THREADS={os.environ.get('TVM_BIND_THREADS', 'unset')}, "
            f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}, "
            f"TVM_THREAD_POOL_SPIN_COUNT={os.environ.get('TVM_THREAD_POOL_SPIN_COUNT', 'unset')})"
        ),
    ]
    if target is not None:
        lines.append(f"target  : {target}")
    lines += [
        (
            f"versions: tvm {_version('tvm')}, tvm_ffi {_version('tvm_ffi')}, onnxruntime {_version('onnxruntime')}, "
            f"numpy {np.__version__}, python {platform.python_version()} ({sys.implementation.name})"
        ),
        f"os      : {platform.platform()}",
        f"date    : {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]
    return "\n".join(lines)


_MEMORY_NOTES = {
    "rss-growth": "peak RSS growth over setup + first run (measured, approximate)",
    "planned": "bytes planned by the cosched memory plan (computed, exact)",
}


def format_table(results: Sequence[Result], baseline_name: str) -> str:
    """A fixed-width table: median and spread in ms, speedup over the baseline, memory."""
    by_name = {r.name: r for r in results}
    if baseline_name not in by_name:
        raise CoschedError(f"no result named {baseline_name!r}", hint=f"results are {list(by_name)}")
    base = by_name[baseline_name]
    sources = sorted({r.memory_source for r in results if r.memory_bytes is not None})
    marks = {s: "*" * (i + 1) for i, s in enumerate(sources)}
    width = max(len("contender"), *(len(r.name) for r in results))
    head = (
        f"{'contender':<{width}}  {'median ms':>10}  {'p25-p75 ms':>17}  {'min ms':>9}  "
        f"{'speedup (base/this, >1 faster)':>30}  {'memory MiB':>11}"
    )
    rows = [head, "-" * len(head)]
    intervals = False
    for r in results:
        gain = speedup(base, r)
        intervals |= gain.interval is not None
        memory = "-" if r.memory_bytes is None else f"{r.memory_bytes / 2**20:.1f}{marks[r.memory_source]}"
        spread = f"{r.p25:.2f}-{r.p75:.2f}"
        rows.append(
            f"{r.name:<{width}}  {r.median_ms:>10.2f}  {spread:>17}  {r.min_ms:>9.2f}  {gain:>30}  {memory:>11}"
        )
    rows.append(
        f"baseline: {baseline_name}; {results[0].repeat if results else 0} runs each, alternated in shuffled rounds"
    )
    if intervals:
        rows.append("speedup: ratio of medians [95% bootstrap interval, resampling the rounds]")
    for s in sources:
        rows.append(f"{marks[s]} {_MEMORY_NOTES.get(s, s)}")
    return "\n".join(rows)


def to_json(results: Sequence[Result], baseline_name: str | None = None) -> str:
    """The results as JSON text (times in ms, memory in bytes), with speedups if a baseline is named."""
    base = None
    if baseline_name is not None:
        match = [r for r in results if r.name == baseline_name]
        if not match:
            raise CoschedError(f"no result named {baseline_name!r}")
        base = match[0]
    rows = []
    for r in results:
        row = asdict(r)
        row["iqr_ms"] = r.iqr_ms
        if base is not None:
            gain = speedup(base, r)
            row["speedup"] = gain.value if np.isfinite(gain.value) else None
            row["speedup_interval"] = gain.interval
        rows.append(row)
    return json.dumps({"baseline": baseline_name, "results": rows}, indent=2)
