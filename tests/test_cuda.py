"""CUDA: cross-compilation, export and the artifact's metadata without a GPU; execution where there is one."""

import os
import shutil
import subprocess

import numpy as np
import pytest

import cosched
from cosched import CoschedError
from cosched.models import tiny_cnn
from cosched.runtime import load, read_artifact, read_manifest
from cosched.runtime.native import cuda_home
from tests.conftest import make_inputs

CUDA_TARGET = {"kind": "cuda", "arch": "sm_90"}
pytestmark = pytest.mark.skipif(cuda_home() is None, reason="no CUDA toolkit to cross-compile with")


def _gpu_count() -> int:
    from cosched.runtime.native import load_executor_module

    try:
        return int(load_executor_module("cuda")["cuda_device_count"]())
    except Exception:
        return 0


needs_gpu = pytest.mark.skipif(_gpu_count() == 0, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tenants():
    return [cosched.load_onnx(tiny_cnn(n, seed=i, width=16, size=24), name=n) for i, n in enumerate("ab")]


@pytest.fixture(scope="module")
def exported(tenants, tmp_path_factory):
    artifact = cosched.build(tenants, target=CUDA_TARGET, num_streams=3, policy="round_robin")
    return artifact, artifact.export(tmp_path_factory.mktemp("cuda") / "bundle")


def test_cross_compiled_bundle_exports_with_its_cuda_executor(exported):
    artifact, path = exported
    manifest = read_manifest(path)
    assert manifest["device"] == "cuda"
    assert '"arch":"sm_90"' in manifest["target"]
    assert manifest["files"]["executor"] == "cosched_executor_cuda.so"
    again = read_artifact(path)
    assert again.schedule == artifact.schedule
    again.schedule.validate()
    assert sum(len(k.waits) for k in again.schedule.kernels) > 0  # round_robin spreads tenants: events needed


def test_kernel_library_holds_every_kernel_and_device_code(exported):
    artifact, path = exported
    if shutil.which("nm") is None:
        pytest.skip("no nm")
    symbols = subprocess.run(["nm", "-D", str(path / "kernels.so")], capture_output=True, text=True).stdout
    assert "__tvm_ffi__library_bin" in symbols  # the embedded CUDA module
    for kernel in artifact.schedule.kernels:
        assert f"__tvm_ffi_{kernel.func}" in symbols


def test_cuda_executor_needs_only_the_driver(exported):
    _, path = exported
    deps = subprocess.run(["ldd", str(path / "cosched_executor_cuda.so")], capture_output=True, text=True).stdout
    assert "libcudart" not in deps  # the CUDA runtime is linked statically


@pytest.mark.skipif(_gpu_count() > 0, reason="this machine has a GPU")
def test_loading_without_a_gpu_is_a_clear_error(exported):
    _, path = exported
    with pytest.raises(CoschedError, match="no CUDA device"):
        load(path)


@needs_gpu
def test_gpu_outputs_equal_cpu_and_streams_overlap(tenants, exported):
    _, path = exported
    gpu = load(path)
    cpu = cosched.compile(tenants, num_streams=1)
    inputs = make_inputs(tenants)
    got, want = gpu.run(inputs), cpu.run(inputs)
    for tenant in want:
        for a, b in zip(got[tenant], want[tenant], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    trace = gpu.profile(inputs)
    assert trace.device == "cuda" and len(trace.events) == len(gpu.schedule.kernels)
    for k in gpu.schedule.kernels:
        by = {e.kernel: e for e in trace.events}
        for w in k.waits:
            assert by[w].end_us <= by[k.id].start_us + 1.0  # event timestamps, 1 us resolution slack


@needs_gpu
def test_gpu_bundle_is_thread_safe(exported, tenants):
    import threading

    gpu = load(exported[1])
    inputs = make_inputs(tenants)
    want = gpu.run(inputs)
    errors = []

    def worker():
        for _ in range(50):
            out = gpu.run(inputs)
            if not all(np.array_equal(a, b) for t in want for a, b in zip(out[t], want[t], strict=True)):
                errors.append("mismatch")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_environment_flag_is_respected():
    assert os.environ.get("TVM_BIND_THREADS") == "0"
