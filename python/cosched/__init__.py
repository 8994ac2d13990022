"""cosched: compile several DNN models into one TVM module and run them co-scheduled.

The compiler side (``compile``, ``load_onnx``, ``tune``) imports TVM's compiler; ``cosched.runtime``
and ``cosched.schedule`` do not, so a deployed bundle loads with the TVM runtime alone.
"""

from __future__ import annotations

import importlib

from .errors import CoschedError

_LAZY = {
    "Tenant": ".tenant",
    "TensorSpec": ".tenant",
    "load_onnx": ".tenant",
    "from_relax": ".tenant",
    "compile": ".compiler",
    "build": ".compiler",
    "reschedule": ".compiler",
    "tune": ".tuning",
    "Schedule": ".schedule",
    "Bundle": "cosched.runtime",
    "Trace": "cosched.runtime",
    "load": "cosched.runtime",
}


def __getattr__(name: str):
    # Lazy, so that ``import cosched.runtime`` on a deployment machine never pulls in the compiler.
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'cosched' has no attribute {name!r}")


__all__ = ["CoschedError", *_LAZY]
__version__ = "0.1.0"
