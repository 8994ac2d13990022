"""The C++ CPU executor's contract on hand-made plans: waits, failures, reuse, parallel loops."""

import ctypes
import os
import threading
import time

import numpy as np
import pytest
import tvm_ffi

from cosched.runtime.native import FACTORIES, executor_library, load_executor_module, load_tvm_runtime

LOG: list[str] = []


@tvm_ffi.register_global_func("cosched_test.record", override=True)
def _record(x):
    LOG.append("ok")


@tvm_ffi.register_global_func("cosched_test.fail", override=True)
def _fail(x):
    raise ValueError("boom")


@pytest.fixture(scope="module")
def create():
    return load_executor_module("cpu")[FACTORIES["cpu"]]


def test_a_failing_kernel_raises_without_hanging_and_the_executor_stays_usable(create):
    ok, fail = tvm_ffi.get_global_func("cosched_test.record"), tvm_ffi.get_global_func("cosched_test.fail")
    tensors = [tvm_ffi.from_dlpack(np.zeros(4, "float32"))]
    # Stream 0 runs ok then fail; stream 1 waits on the failing call: it must be released, not hang.
    run = create([ok, fail, ok, ok], [[0], [0], [0], [0]], [[], [], [1], []], [[0, 1], [2, 3]], [1, 1], 2, True)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="kernel call 1 failed: boom"):
            run(tensors, None)


def test_timings_respect_waits_across_streams(create):
    ok = tvm_ffi.get_global_func("cosched_test.record")
    tensors = [tvm_ffi.from_dlpack(np.zeros(4, "float32"))]
    run = create([ok, ok, ok], [[0], [0], [0]], [[], [0], [1]], [[0, 2], [1]], [2, 2], 2, True)
    timings = np.zeros((3, 2), dtype=np.int64)
    LOG.clear()
    run(tensors, tvm_ffi.from_dlpack(timings))
    assert LOG == ["ok"] * 3
    assert timings[0, 1] <= timings[1, 0] and timings[1, 1] <= timings[2, 0]


# The ABI of a compiled kernel's parallel loop: int lambda(int task_id, TVMParallelGroupEnv*, void*).
class _GroupEnv(ctypes.Structure):
    _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]


_LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(_GroupEnv), ctypes.c_void_p)


@pytest.fixture(scope="module")
def launcher():
    """The executor library's parallel launch, as a compiled kernel would call it."""
    load_tvm_runtime()  # the launcher hands calls from other threads on to TVM's
    lib = ctypes.CDLL(str(executor_library("cpu")))
    lib.cosched_parallel_launch.argtypes = [_LAMBDA, ctypes.c_void_p, ctypes.c_int]
    return lib


def _parallel_kernel(name: str, launcher, body, after=None):
    """A kernel that runs one parallel loop whose task ``t`` calls ``body(t, env)``, records the
    launch's status, and calls ``after(status)`` on its own thread."""
    fn = _LAMBDA(lambda task, env, _: body(task, env.contents))
    status: list[int] = []

    def kernel(x):
        status.append(launcher.cosched_parallel_launch(fn, None, 0))
        if after is not None:
            after(status[-1])

    kernel.status, kernel.fn = status, fn  # fn: the callback must outlive the kernel
    tvm_ffi.register_global_func(name, kernel, override=True)
    return kernel


def test_a_parallel_loop_runs_on_the_stream_worker_and_the_helpers_of_its_grant(create, launcher):
    seen: dict[int, tuple[int, int]] = {}
    together = threading.Barrier(2, timeout=10)

    def body(task, env):
        seen[task] = (threading.get_ident(), env.num_task)
        if env.num_task == 2:
            together.wait()  # both tasks at once: on two threads, or a BrokenBarrierError
        else:
            time.sleep(0.005)  # long enough for the idle helper to wake and join
        return 0

    kernel = _parallel_kernel("cosched_test.parallel", launcher, body)
    tensors = [tvm_ffi.from_dlpack(np.zeros(4, "float32"))]
    fn = tvm_ffi.get_global_func("cosched_test.parallel")
    # One stream, two cores: the loop gets the worker and one helper.
    run = create([fn], [[0]], [[]], [[0]], [2], 2, True)
    for _ in range(3):
        seen.clear()
        run(tensors, None)
        assert sorted(seen) == [0, 1] and {n for _, n in seen.values()} == {2}
        assert seen[0][0] != seen[1][0] and threading.get_ident() not in {t for t, _ in seen.values()}
    assert kernel.status == [0, 0, 0]
    # A stream capped at one core: its loop is cut in two tasks per core, and the idle core's helper joins.
    seen.clear()
    create([fn], [[0]], [[]], [[0]], [1], 2, True)(tensors, None)
    assert sorted(seen) == [0, 1, 2, 3] and len({t for t, _ in seen.values()}) == 2 and kernel.status[-1] == 0
    # Without the executor's helpers the loop goes to TVM's pool, which runs it too.
    seen.clear()
    create([fn], [[0]], [[]], [[0]], [2], 2, False)(tensors, None)
    assert kernel.status[-1] == 0 and sorted(seen) == list(range(seen[0][1]))


def test_no_helper_joins_a_loop_while_every_core_is_granted(create, launcher):
    seen: dict[int, int] = {}
    b_started, a_done = threading.Event(), threading.Event()

    def body(task, env):
        seen[task] = threading.get_ident()
        return 0

    def after(status):
        a_done.set()

    loop = _parallel_kernel("cosched_test.loop", launcher, body, after)

    @tvm_ffi.register_global_func("cosched_test.hold", override=True)
    def hold(x):  # holds stream b's core until stream a's loop is done
        b_started.set()
        a_done.wait(10)

    @tvm_ffi.register_global_func("cosched_test.await_b", override=True)
    def await_b(x):
        b_started.wait(10)

    fns = [tvm_ffi.get_global_func(f"cosched_test.{n}") for n in ("await_b", "loop", "hold")]
    tensors = [tvm_ffi.from_dlpack(np.zeros(4, "float32"))]
    # Two streams of one core each on two cores, both busy: the loop's tasks stay on its worker.
    create(fns, [[0], [0], [0]], [[], [], []], [[0, 1], [2]], [1, 1], 2, True)(tensors, None)
    assert loop.status == [0] and len(seen) == 4 and len(set(seen.values())) == 1


def test_a_failing_parallel_task_on_a_helper_fails_the_loop_with_its_error(create, launcher):
    ffi_lib = ctypes.CDLL(tvm_ffi.libinfo.find_libtvm_ffi())
    ffi_lib.TVMFFIErrorSetRaisedFromCStr.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    ffi_lib.TVMFFIErrorMoveFromRaised.argtypes = [ctypes.c_void_p]
    ffi_lib.TVMFFIObjectDecRef.argtypes = [ctypes.c_void_p]

    def body(task, env):
        if task == 1:
            ffi_lib.TVMFFIErrorSetRaisedFromCStr(b"ValueError", b"task 1 broke")
            return -1
        return 0

    raised: list[bool] = []

    def after(status):
        # What the kernel's wrapper would raise: the helper's error, moved to this thread.
        handle = ctypes.c_void_p()
        ffi_lib.TVMFFIErrorMoveFromRaised(ctypes.byref(handle))
        raised.append(bool(handle.value))
        if handle.value:
            ffi_lib.TVMFFIObjectDecRef(handle)

    kernel = _parallel_kernel("cosched_test.parallel_fail", launcher, body, after)
    tensors = [tvm_ffi.from_dlpack(np.zeros(4, "float32"))]
    run = create([tvm_ffi.get_global_func("cosched_test.parallel_fail")], [[0]], [[]], [[0]], [2], 2, True)
    for _ in range(2):
        run(tensors, None)
    assert kernel.status == [-1, -1] and raised == [True, True]


def test_a_compiled_kernels_parallel_loop_is_routed_to_the_executor(create, tmp_path):
    """TVM-compiled kernels reach the executor's launcher once their library is routed, compute the
    same there and off the executor's threads (handed on to TVM), and a library without parallel
    loops is left alone."""
    import tvm
    from tvm import te

    from cosched.runtime.native import load_kernels, route_parallel_loops
    from cosched.target import host_target

    def library(name: str, parallel: bool):
        x = te.placeholder((64, 256), "float32", name="x")
        y = te.compute((64, 256), lambda i, j: x[i, j] * 2.0 + 1.0, name="y")
        sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]).with_attr("global_symbol", name))
        if parallel:
            sch.parallel(sch.get_loops(sch.get_sblock("y"))[0])
        path = tmp_path / f"{name}.so"
        tvm.compile(sch.mod, host_target(2)).export_library(str(path))
        return path

    path = library("scale", parallel=True)
    kernel = load_kernels(path)["scale"]
    assert route_parallel_loops(path, executor_library("cpu"))
    slot = ctypes.c_void_p.in_dll(ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD), "__TVMBackendParallelLaunch")
    ours = ctypes.CDLL(str(executor_library("cpu")), mode=os.RTLD_NOLOAD).cosched_parallel_launch
    assert slot.value == ctypes.cast(ours, ctypes.c_void_p).value
    x = np.random.default_rng(0).standard_normal((64, 256)).astype("float32")
    for streams, threads, own in (([[0]], [2], True), ([[0]], [1], True), ([[0]], [2], False)):
        y = np.zeros_like(x)
        create([kernel], [[0, 1]], [[]], streams, threads, 2, own)([tvm_ffi.from_dlpack(a) for a in (x, y)], None)
        np.testing.assert_allclose(y, x * 2 + 1, rtol=1e-6)
    y = np.zeros_like(x)
    kernel(tvm_ffi.from_dlpack(x), tvm_ffi.from_dlpack(y))  # this thread is not a stream worker: TVM's pool
    np.testing.assert_allclose(y, x * 2 + 1, rtol=1e-6)
    serial = library("serial", parallel=False)
    load_kernels(serial)
    assert not route_parallel_loops(serial, executor_library("cpu"))
