"""Loading the TVM runtime library, compiled kernels and cosched's C++ executor, without the compiler."""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from pathlib import Path

# TVM's thread pool pins its calling thread to core 0 and later threads inherit that: with pinning on,
# the stream workers would all share one core. Must be set before the runtime creates any pool.
os.environ.setdefault("TVM_BIND_THREADS", "0")
# A pool's size is fixed when it is created (TVM_NUM_THREADS, else half the cores) and
# runtime.config_threadpool can only shrink it: let pools reach every core, then size each worker's.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import tvm_ffi

from cosched.errors import CoschedError

SOURCES = Path(__file__).parent / "src"
EXECUTORS = {"cpu": ("executor.cc", "cosched_executor.so"), "cuda": ("executor_cuda.cc", "cosched_executor_cuda.so")}
FACTORIES = {"cpu": "create_cpu_executor", "cuda": "create_cuda_executor"}
_RUNTIME_ENV = "COSCHED_TVM_RUNTIME"


def tvm_runtime_library() -> Path | None:
    """Path of libtvm_runtime.so: $COSCHED_TVM_RUNTIME, else inside an installed tvm package.

    The package is looked up on sys.path, not imported: importing tvm loads the whole compiler.
    """
    if os.environ.get(_RUNTIME_ENV):
        return Path(os.environ[_RUNTIME_ENV])
    for entry in sys.path:
        candidate = Path(entry or ".") / "tvm" / "lib" / "libtvm_runtime.so"
        if candidate.exists():
            return candidate
    return None


def load_tvm_runtime(device: str = "cpu") -> None:
    """Make the TVM runtime's symbols (parallel launch, workspaces, thread pool; CUDA modules) visible."""
    path = tvm_runtime_library()
    if path is None or not path.exists():
        raise CoschedError(
            "cannot find libtvm_runtime.so",
            hint=f"install apache-tvm or point {_RUNTIME_ENV} at the runtime library",
        )
    # RTLD_GLOBAL: exported kernel libraries resolve TVMBackend* against it.
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    if device == "cuda":
        # Registers the loader for the CUDA device code embedded in the kernel library.
        ctypes.CDLL(str(path.with_name("libtvm_runtime_cuda.so")), mode=ctypes.RTLD_GLOBAL)


def load_kernels(path: str | Path, device: str = "cpu") -> tvm_ffi.Module:
    """Load an exported kernel library with tvm-ffi alone."""
    load_tvm_runtime(device)
    try:
        return tvm_ffi.load_module(str(path))
    except Exception as err:
        raise CoschedError(f"cannot load kernel library {path}: {err}", hint="re-export the bundle") from None


def route_parallel_loops(kernel_lib: str | Path, executor_lib: str | Path) -> bool:
    """Point a loaded kernel library's parallel loops at the executor's helper threads.

    Compiled CPU kernels call TVM's parallel launch through a function pointer in their own library
    (``__TVMBackendParallelLaunch``, filled in at load); the executor's launcher runs the loop on the
    calling stream's core grant and hands any other caller on to TVM. False when nothing was routed:
    the library has no parallel loops, or kernels with barriers between parallel tasks (which assume
    one thread per task, as TVM's pool gives them).
    """
    kernels = ctypes.CDLL(str(kernel_lib), mode=os.RTLD_NOLOAD)
    try:
        ctypes.c_void_p.in_dll(kernels, "__TVMBackendParallelBarrier")
        return False
    except ValueError:
        pass
    try:
        slot = ctypes.c_void_p.in_dll(kernels, "__TVMBackendParallelLaunch")
    except ValueError:
        return False
    executor = ctypes.CDLL(str(executor_lib), mode=os.RTLD_NOLOAD)
    slot.value = ctypes.cast(executor.cosched_parallel_launch, ctypes.c_void_p).value
    return True


def cuda_home() -> Path | None:
    """The CUDA toolkit: $CUDA_HOME, else the one nvcc belongs to."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    return next((c for c in candidates if (c / "include" / "cuda_runtime.h").exists()), None)


def build_executor(device: str = "cpu", build_directory: str | Path | None = None) -> Path:
    """Compile the executor for ``device`` with tvm-ffi's builder (cached); returns the shared library.

    The CUDA executor links the CUDA runtime statically, so a GPU machine needs only the driver.
    """
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise CoschedError(
            "no C++ compiler to build the cosched executor",
            hint="install g++, or load an exported bundle, which ships its executor",
        )
    from tvm_ffi.cpp import build

    source, _ = EXECUTORS[device]
    cflags, ldflags, includes = ["-O2", "-std=c++17"], ["-ldl"], [str(SOURCES)]
    if device == "cuda":
        home = cuda_home()
        if home is None or not (home / "include" / "cuda_runtime.h").exists():
            raise CoschedError(
                "no CUDA toolkit to build the CUDA executor",
                hint="install the CUDA toolkit (nvcc) on the build machine or set CUDA_HOME",
            )
        includes.append(str(home / "include"))
        ldflags = [f"-L{home / 'lib64'}", "-l:libcudart_static.a", "-ldl", "-lrt", "-lpthread"]
    name = Path(EXECUTORS[device][1]).stem
    return Path(
        build(
            name,
            sources=[str(SOURCES / source)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=includes,
            build_directory=None if build_directory is None else str(build_directory),
        )
    )


def executor_library(device: str = "cpu", path: str | Path | None = None) -> Path:
    """The executor library for ``device``: a prebuilt one (from a bundle), else a fresh (cached) build."""
    return Path(path) if path is not None and Path(path).exists() else build_executor(device)


def load_executor_module(device: str = "cpu", path: str | Path | None = None) -> tvm_ffi.Module:
    """The executor library for ``device``, loaded."""
    return tvm_ffi.load_module(str(executor_library(device, path)))
