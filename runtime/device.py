"""Where a bundle's tensors live and how its executor is made: the host CPU, or a CUDA GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tvm_ffi

from cosched.errors import CoschedError

from .memory import ALIGN
from .native import FACTORIES, executor_library, load_executor_module, route_parallel_loops


def aligned_empty(nbytes: int) -> np.ndarray:
    """Uninitialised host bytes aligned like TVM's own allocations (kernels may assume it)."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGN
    return raw[offset : offset + nbytes]


def aligned_array(shape: list[int], dtype: str) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return aligned_empty(max(nbytes, 1))[:nbytes].view(dtype).reshape(shape)


class CpuDevice:
    """Tensors are views of aligned numpy memory; streams are worker threads."""

    name = "cpu"

    def __init__(self, executor_lib: str | None = None):
        self.library = executor_library("cpu", executor_lib)
        self.module = load_executor_module("cpu", self.library)
        self._create = self.module[FACTORIES["cpu"]]

    def adopt_kernels(self, kernel_lib: str | Path) -> bool:
        """Run the kernels' parallel loops on the executor's threads rather than TVM's pools, if it can."""
        return route_parallel_loops(kernel_lib, self.library)

    def create_executor(self, kernels, args, waits, stream_calls, threads, cores, own_threads: bool = True) -> Any:
        return self._create(kernels, args, waits, stream_calls, threads, cores, own_threads)

    def block(self, nbytes: int) -> Any:
        return aligned_empty(nbytes)

    def view(self, block: Any, shape: list[int], dtype: str) -> Any:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return tvm_ffi.from_dlpack(block[:nbytes].view(dtype).reshape(shape))

    def empty(self, shape: list[int], dtype: str) -> Any:
        return tvm_ffi.from_dlpack(aligned_array(shape, dtype))

    def upload(self, dst: Any, src: np.ndarray) -> None:
        np.copyto(np.from_dlpack(dst), src)

    def download(self, src: Any) -> np.ndarray:
        return np.from_dlpack(src).copy()


class CudaDevice:
    """Tensors in device memory (cudaMalloc); streams are CUDA streams ordered by events."""

    name = "cuda"

    def __init__(self, executor_lib: str | None = None, device_id: int = 0):
        self.module = load_executor_module("cuda", executor_lib)
        count = int(self.module["cuda_device_count"]())
        if count <= device_id:
            raise CoschedError(
                f"no CUDA device {device_id} here ({count} found)",
                hint="run this bundle on a GPU machine; export it with Artifact.export() to move it there",
            )
        self.device_id = device_id
        self._create = self.module[FACTORIES["cuda"]]
        self._empty = self.module["cuda_empty"]
        self._view = self.module["cuda_view"]
        self._copy = self.module["cuda_copy"]

    def adopt_kernels(self, kernel_lib: str | Path) -> bool:
        """Nothing to route: GPU kernels have no host-side parallel loops."""
        return False

    def create_executor(self, kernels, args, waits, stream_calls, threads, cores, own_threads: bool = True) -> Any:
        return self._create(kernels, args, waits, stream_calls, threads, self.device_id)

    def block(self, nbytes: int) -> Any:
        return self._empty(tvm_ffi.Shape([max(nbytes, 1)]), tvm_ffi.dtype("uint8"), self.device_id)

    def view(self, block: Any, shape: list[int], dtype: str) -> Any:
        return self._view(block, tvm_ffi.Shape(shape), tvm_ffi.dtype(dtype))

    def empty(self, shape: list[int], dtype: str) -> Any:
        return self._empty(tvm_ffi.Shape(shape), tvm_ffi.dtype(dtype), self.device_id)

    def upload(self, dst: Any, src: np.ndarray) -> None:
        self._copy(dst, tvm_ffi.from_dlpack(np.ascontiguousarray(src)))

    def download(self, src: Any) -> np.ndarray:
        out = np.empty(tuple(src.shape), dtype=str(src.dtype))
        self._copy(tvm_ffi.from_dlpack(out), src)
        return out


def make_device(name: str, executor_lib: str | None = None) -> CpuDevice | CudaDevice:
    if name == "cpu":
        return CpuDevice(executor_lib)
    if name == "cuda":
        return CudaDevice(executor_lib)
    raise CoschedError(f"unknown device {name!r}", hint="bundles run on 'cpu' or 'cuda'")
