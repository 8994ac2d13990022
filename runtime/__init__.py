"""cosched.runtime: runs a co-scheduled bundle; needs only tvm-ffi and the TVM runtime library.

``load(dir)`` reads an exported bundle (kernels as a shared library, the schedule as JSON, params as
npz) without importing TVM's compiler.
"""

from .bundle import Artifact, Bundle, load, read_artifact, read_manifest
from .memory import MemoryPlan, plan_memory
from .trace import Trace, TraceEvent

__all__ = [
    "Artifact",
    "Bundle",
    "MemoryPlan",
    "Trace",
    "TraceEvent",
    "load",
    "plan_memory",
    "read_artifact",
    "read_manifest",
]
