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

import tvm_ffi  # noqa: E402

from cosched.errors import CoschedError  # noqa: E402

EXECUTOR_SOURCE = Path(__file__).parent / "src" / "executor.cc"
EXECUTOR_LIB = "cosched_executor.so"
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


def load_tvm_runtime() -> None:
    """Make the TVM runtime's symbols (parallel launch, workspaces, thread pool) visible to kernels."""
    path = tvm_runtime_library()
    if path is None or not path.exists():
        raise CoschedError(
            "cannot find libtvm_runtime.so",
            hint=f"install apache-tvm or point {_RUNTIME_ENV} at the runtime library",
        )
    # RTLD_GLOBAL: exported kernel libraries resolve TVMBackend* against it.
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def load_kernels(path: str | Path) -> tvm_ffi.Module:
    """Load an exported kernel library with tvm-ffi alone."""
    load_tvm_runtime()
    try:
        return tvm_ffi.load_module(str(path))
    except Exception as err:
        raise CoschedError(f"cannot load kernel library {path}: {err}", hint="re-export the bundle") from None


def build_executor(build_directory: str | Path | None = None) -> Path:
    """Compile the C++ executor with tvm-ffi's builder (cached); returns the shared library."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise CoschedError(
            "no C++ compiler to build the cosched executor",
            hint="install g++, or load an exported bundle, which ships its executor",
        )
    from tvm_ffi.cpp import build

    return Path(build("cosched_executor", sources=[str(EXECUTOR_SOURCE)], extra_cflags=["-O2", "-std=c++17"],
                      build_directory=None if build_directory is None else str(build_directory)))


def load_executor(path: str | Path | None = None) -> tvm_ffi.Function:
    """The ``create_cpu_executor`` factory from a prebuilt library, or from a fresh (cached) build."""
    lib = Path(path) if path is not None and Path(path).exists() else build_executor()
    module = tvm_ffi.load_module(str(lib))
    return module["create_cpu_executor"]
