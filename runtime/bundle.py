"""Bundle: compiled kernels + a schedule + params, run by cosched's executor; export and load."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tvm_ffi

from cosched.errors import CoschedError
from cosched.schedule import Schedule

from .device import make_device
from .memory import MemoryPlan, plan_memory
from .native import EXECUTORS, build_executor, load_kernels
from .trace import Trace, TraceEvent

FORMAT = "cosched-bundle"
FORMAT_VERSION = 1
KERNELS_LIB = "kernels.so"


@dataclass
class Artifact:
    """What a bundle is made of: schedule, kernel library, params, target and device.

    An artifact can be exported and read anywhere; running it (``load``) needs its device. This is
    how a CUDA bundle is cross-compiled on a machine without a GPU and deployed to one.
    """

    schedule: Schedule
    kernel_lib: Path
    params: dict[int, np.ndarray]
    target: str = ""
    device: str = "cpu"
    ir: Any = None
    executor_lib: Path | None = None

    def load(self) -> Bundle:
        return Bundle(self)

    def export(self, path: str | Path) -> Path:
        """Write kernels, executor, schedule and params to a folder, atomically (temp folder, then rename)."""
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        executor = self.executor_lib if self.executor_lib is not None else build_executor(self.device)
        executor_name = EXECUTORS[self.device][1]
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            shutil.copyfile(self.kernel_lib, tmp / KERNELS_LIB)
            shutil.copyfile(executor, tmp / executor_name)
            self.schedule.save(tmp / "schedule.json")
            np.savez(tmp / "params.npz", **{f"b{bid}": arr for bid, arr in self.params.items()})
            if self.ir is not None:
                (tmp / "ir.txt").write_text(self.ir.script() if hasattr(self.ir, "script") else str(self.ir))
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "target": self.target,
                "device": self.device,
                "tenants": self.schedule.tenant_names(),
                "streams": self.schedule.num_streams,
                "planned_bytes": plan_memory(self.schedule).planned_bytes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": {
                    "kernels": KERNELS_LIB,
                    "executor": executor_name,
                    "schedule": "schedule.json",
                    "params": "params.npz",
                },
            }
            # The manifest last: a folder without one is never taken for a bundle.
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


@dataclass
class _Session:
    """What one run needs to itself: workspace, input/output tensors and an executor with its streams."""

    run: Any  # the executor's run(tensors, timings)
    tensors: list[Any]
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, list[Any]]
    storage: list[Any]  # keeps the planned blocks alive as long as the views into them
    parallel: str  # who ran its parallel loops (Bundle.parallel when it was made)


class Bundle:
    """Several models compiled into one module, run together under a co-schedule.

    ``run`` is safe to call from several threads at once: each concurrent call gets its own session
    (workspace and stream workers); sessions are reused afterwards.
    """

    def __init__(self, artifact: Artifact, _same_kernels: Bundle | None = None):
        schedule = artifact.schedule
        schedule.validate()
        self.artifact = artifact
        if _same_kernels is not None:  # with_schedule: device, kernels and weights are already loaded
            self._device, self._module = _same_kernels._device, _same_kernels._module
            self._routed = _same_kernels._routed
        else:
            # The device first: without one, say so before the loader fails on missing driver libraries.
            self._device = make_device(artifact.device, artifact.executor_lib)
            self._module = load_kernels(artifact.kernel_lib, artifact.device)
            self._routed = self._device.adopt_kernels(artifact.kernel_lib)
        try:
            self._kernels = [self._module[k.func] for k in schedule.kernels]
        except Exception as err:
            raise CoschedError(
                f"kernel library lacks a kernel of the schedule: {err}",
                hint="rebuild the bundle; schedule and kernels do not match",
            ) from None
        self._buffers = {b.id: b for b in schedule.buffers}
        missing = [b.id for b in schedule.buffers if b.kind == "param" and b.id not in artifact.params]
        if missing:
            raise CoschedError(f"params missing for buffers {missing[:5]}", hint="re-export the bundle")
        # Params are read-only: shared by all sessions, and by the bundles ``with_schedule`` makes.
        self._params = _same_kernels._params if _same_kernels is not None else self._upload(artifact.params)
        self.memory: MemoryPlan = plan_memory(schedule)
        position = {k.id: i for i, k in enumerate(schedule.kernels)}
        self._plan_args = [list(k.args) for k in schedule.kernels]
        self._plan_waits = [[position[w] for w in k.waits] for k in schedule.kernels]
        self._plan_streams = [[position[k.id] for k in schedule.stream_kernels(s.id)] for s in schedule.streams]
        self._lock = threading.Lock()
        self._idle: list[_Session] = []
        self._parallel = "cosched"
        self.search_report = None

    @property
    def parallel(self) -> str:
        """Who runs the kernels' parallel loops on CPU: ``"cosched"`` or ``"tvm"``.

        ``"cosched"`` (the default): the executor's helper threads, as many as the cores granted to the
        kernel's stream. ``"tvm"``: each stream worker's own TVM thread pool, whose idle workers spin
        on the cores other streams need; kept to compare against.
        """
        return self._parallel

    @parallel.setter
    def parallel(self, value: str) -> None:
        if value not in ("cosched", "tvm"):
            raise CoschedError(f"unknown parallel runner {value!r}", hint='use "cosched" or "tvm"')
        self._parallel = value

    @property
    def loops_on_helpers(self) -> bool:
        """Whether the kernels' parallel loops run on the executor's helpers, so that cores no stream
        holds join loops granted fewer cores (CPU, ``parallel == "cosched"``, a library it could route)."""
        return self._parallel == "cosched" and self._routed

    def _upload(self, params: dict[int, np.ndarray]) -> dict[int, Any]:
        uploaded = {}
        for bid, value in params.items():
            uploaded[bid] = self._device.empty(list(value.shape), str(value.dtype))
            self._device.upload(uploaded[bid], value)
        return uploaded

    @property
    def schedule(self) -> Schedule:
        return self.artifact.schedule

    @property
    def ir(self) -> Any:
        """The annotated IRModule (None for a bundle loaded from disk; see ir.txt there)."""
        return self.artifact.ir

    @property
    def target(self) -> str:
        return self.artifact.target

    @property
    def device(self) -> str:
        return self.artifact.device

    @property
    def kernel_lib(self) -> Path:
        return self.artifact.kernel_lib

    # -- introspection --------------------------------------------------------------------------
    @property
    def tenants(self) -> list[str]:
        return self.schedule.tenant_names()

    @property
    def planned_bytes(self) -> int:
        """Bytes of intermediate storage one run needs under the memory plan."""
        return self.memory.planned_bytes

    @property
    def unplanned_bytes(self) -> int:
        """Intermediate bytes if every tensor had its own memory (for comparison)."""
        return sum(b.nbytes for b in self.schedule.buffers if b.kind == "intermediate")

    def input_specs(self) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
        """``{tenant: {input: (shape, dtype)}}``."""
        return {
            t.name: {n: (tuple(self._buffers[b].shape), self._buffers[b].dtype) for n, b in t.inputs.items()}
            for t in self.schedule.tenants
        }

    def random_inputs(self, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
        """Seeded standard-normal inputs of the right shapes and dtypes for every tenant."""
        rng = np.random.default_rng(seed)
        return {
            t: {n: rng.standard_normal(shape).astype(dtype) for n, (shape, dtype) in specs.items()}
            for t, specs in self.input_specs().items()
        }

    # -- running ----------------------------------------------------------------------------------
    def _new_session(self) -> _Session:
        device = self._device
        storage = [device.block(n) for n in self.memory.storage_bytes]
        tensors: list[Any] = [None] * (max(self._buffers) + 1)
        for b in self.schedule.buffers:
            if b.kind == "param":
                tensors[b.id] = self._params[b.id]
            elif b.kind == "intermediate":
                tensors[b.id] = device.view(storage[self.memory.buffer_storage[b.id]], b.shape, b.dtype)
            else:
                tensors[b.id] = device.empty(b.shape, b.dtype)
        inputs = {t.name: {n: tensors[b] for n, b in t.inputs.items()} for t in self.schedule.tenants}
        outputs = {t.name: [tensors[b] for b in t.outputs] for t in self.schedule.tenants}
        run = device.create_executor(
            self._kernels,
            self._plan_args,
            self._plan_waits,
            self._plan_streams,
            [s.threads for s in self.schedule.streams],
            max(self.schedule.cores, 1),
            # Loops a library keeps on TVM's pools need the pools sized to the grants.
            self.loops_on_helpers,
        )
        return _Session(
            run=run, tensors=tensors, inputs=inputs, outputs=outputs, storage=storage, parallel=self._parallel
        )

    def _check_inputs(self, inputs: dict) -> dict[str, dict[str, np.ndarray]]:
        if not isinstance(inputs, dict):
            raise CoschedError("inputs must be a dict {tenant: {input: array}}", hint=f"tenants are {self.tenants}")
        for name in inputs:
            if name not in self.tenants:
                raise CoschedError(
                    "no such tenant in this bundle", tenant=str(name), hint=f"tenants are {self.tenants}"
                )
        checked: dict[str, dict[str, np.ndarray]] = {}
        for tenant, specs in self.input_specs().items():
            if tenant not in inputs:
                raise CoschedError(
                    "no inputs given for this tenant",
                    tenant=tenant,
                    hint=f"pass {{'{tenant}': {{{', '.join(repr(n) for n in specs)}: array}}}}",
                )
            given = inputs[tenant]
            if not isinstance(given, dict):
                raise CoschedError(
                    "inputs must be a dict {input name: array}", tenant=tenant, hint=f"inputs are {list(specs)}"
                )
            for name in given:
                if name not in specs:
                    raise CoschedError(f"unknown input {name!r}", tenant=tenant, hint=f"inputs are {list(specs)}")
            checked[tenant] = {}
            for name, (shape, dtype) in specs.items():
                if name not in given:
                    raise CoschedError(f"missing input {name!r}", tenant=tenant, hint=f"inputs are {list(specs)}")
                arr = np.asarray(given[name])
                if tuple(arr.shape) != shape:
                    raise CoschedError(
                        f"input {name!r} has shape {tuple(arr.shape)}, expected {shape}",
                        tenant=tenant,
                        hint="compile the bundle for this shape or resize the input",
                    )
                if str(arr.dtype) != dtype:
                    raise CoschedError(
                        f"input {name!r} has dtype {arr.dtype}, expected {dtype}",
                        tenant=tenant,
                        hint=f"convert it with .astype('{dtype}')",
                    )
                checked[tenant][name] = arr
        return checked

    def _execute(self, inputs: dict, timings: np.ndarray | None) -> dict[str, list[np.ndarray]]:
        checked = self._check_inputs(inputs)
        with self._lock:
            while self._idle and self._idle[-1].parallel != self._parallel:
                self._idle.pop()
            session = self._idle.pop() if self._idle else None
        if session is None:
            session = self._new_session()
        try:
            for tenant, arrays in checked.items():
                for name, arr in arrays.items():
                    self._device.upload(session.inputs[tenant][name], arr)
            session.run(session.tensors, None if timings is None else tvm_ffi.from_dlpack(timings))
            return {t: [self._device.download(o) for o in outs] for t, outs in session.outputs.items()}
        finally:
            with self._lock:
                self._idle.append(session)

    def run(self, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
        """Run every tenant once: ``{tenant: {input: array}} -> {tenant: [outputs]}``."""
        return self._execute(inputs, None)

    def profile(self, inputs: dict[str, dict[str, np.ndarray]], warmup: int = 1) -> Trace:
        """Run once more after ``warmup`` runs, recording each kernel's start and end on its stream."""
        for _ in range(warmup):
            self._execute(inputs, None)
        timings = np.zeros((len(self.schedule.kernels), 2), dtype=np.int64)
        self._execute(inputs, timings)
        events = [
            TraceEvent(k.id, k.func, k.tenant, k.stream, float(t[0]) / 1e3, float(t[1]) / 1e3)
            for k, t in zip(self.schedule.kernels, timings, strict=True)
        ]
        return Trace(events=events, num_streams=self.schedule.num_streams, tenants=self.tenants, device=self.device)

    def with_schedule(self, schedule: Schedule, params: dict[int, np.ndarray] | None = None) -> Bundle:
        """A bundle over the same kernels with another schedule of the same module (e.g. from search).

        It shares this bundle's loaded kernels and device copy of the params unless ``params`` replaces
        them: a search builds dozens of candidates, and a copy of the weights each multiplied device
        memory by as many.
        """
        if params is not None:
            return Bundle(replace(self.artifact, schedule=schedule, params=params, ir=None))
        return Bundle(replace(self.artifact, schedule=schedule, ir=None), _same_kernels=self)

    def params(self) -> dict[int, np.ndarray]:
        return dict(self.artifact.params)

    def export(self, path: str | Path) -> Path:
        """Write the bundle to a folder that ``cosched.runtime.load`` reads; see :meth:`Artifact.export`."""
        return self.artifact.export(path)


def read_manifest(path: str | Path) -> dict:
    """An exported bundle's manifest (target, device, tenants, files); needs no device and loads nothing."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise CoschedError(
            f"{path} is not a cosched bundle (no manifest.json)", hint="export one with Bundle.export(path)"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CoschedError(
            f"{path} has bundle format {manifest.get('format')} v{manifest.get('version')}",
            hint=f"re-export it with this cosched ({FORMAT} v{FORMAT_VERSION})",
        )
    return manifest


def read_artifact(path: str | Path) -> Artifact:
    """An exported bundle as an Artifact: schedule and params read, no library loaded (works without its device)."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    schedule = Schedule.load(path / files["schedule"])
    with np.load(path / files["params"], allow_pickle=False) as data:
        params = {int(key[1:]): data[key] for key in data.files}
    return Artifact(
        schedule,
        path / files["kernels"],
        params,
        target=manifest.get("target", ""),
        device=manifest.get("device", "cpu"),
        executor_lib=path / files["executor"],
    )


def load(path: str | Path) -> Bundle:
    """Load an exported bundle with the TVM runtime alone (no compiler, no pickle)."""
    return read_artifact(path).load()
