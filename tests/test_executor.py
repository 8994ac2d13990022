"""The C++ CPU executor's contract on hand-made plans: waits, failures, reuse."""

import numpy as np
import pytest
import tvm_ffi

from cosched.runtime.native import FACTORIES, load_executor_module

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
    run = create([ok, fail, ok, ok], [[0], [0], [0], [0]], [[], [], [1], []], [[0, 1], [2, 3]], [1, 1], 2)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="kernel call 1 failed: boom"):
            run(tensors, None)


def test_timings_respect_waits_across_streams(create):
    ok = tvm_ffi.get_global_func("cosched_test.record")
    tensors = [tvm_ffi.from_dlpack(np.zeros(4, "float32"))]
    run = create([ok, ok, ok], [[0], [0], [0]], [[], [0], [1]], [[0, 2], [1]], [2, 2], 2)
    timings = np.zeros((3, 2), dtype=np.int64)
    LOG.clear()
    run(tensors, tvm_ffi.from_dlpack(timings))
    assert LOG == ["ok"] * 3
    assert timings[0, 1] <= timings[1, 0] and timings[1, 1] <= timings[2, 0]
