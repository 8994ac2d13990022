"""Each tenant compiled and run alone on the Relax VM: the reference for outputs and the baseline for speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .tenant import Tenant


def lower_alone(tenant: Tenant, target: tvm.target.Target, database: str | Path | None = None) -> tvm.IRModule:
    """The tenant's module through the same lowering (and database) as a bundle, without merging."""
    from cosched.passes import LowerKernels

    return LowerKernels(target, database)(tenant.mod)


class AloneRunner:
    """One tenant on its own Relax VM: ``run({input: array}) -> [outputs]``."""

    def __init__(self, tenant: Tenant, target: tvm.target.Target, database: str | Path | None = None):
        self.tenant = tenant
        self.executable = tvm.compile(lower_alone(tenant, target, database), target=target)
        self.vm = relax.VirtualMachine(self.executable, tvm.cpu())

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [tvm.runtime.tensor(inputs[spec.name]) for spec in self.tenant.inputs]
        out = self.vm["main"](*args)
        return _flatten(out)


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [a for v in value for a in _flatten(v)]
