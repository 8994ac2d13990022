"""Each tenant compiled and run alone on the Relax VM: the reference for outputs and the baseline for speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .tenant import Tenant


def compile_alone(tenant: Tenant, target: tvm.target.Target, database: str | Path | None = None):
    """The tenant alone for the Relax VM, through the same lowering (and database) as a bundle."""
    from cosched.passes import LowerKernels

    if database is not None:
        from .tuning_db import check_database

        check_database(database, target)
    return tvm.compile(LowerKernels(target, database)(tenant.mod), target=target)


class AloneRunner:
    """One tenant on its own Relax VM: ``run({input: array}) -> [outputs]``."""

    def __init__(self, tenant: Tenant, target: tvm.target.Target, database: str | Path | None = None):
        self.tenant = tenant
        self.executable = compile_alone(tenant, target, database)
        self.vm = relax.VirtualMachine(self.executable, tvm.cpu())

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [tvm.runtime.tensor(inputs[spec.name]) for spec in self.tenant.inputs]
        out = self.vm["main"](*args)
        return _flatten(out)


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [a for v in value for a in _flatten(v)]
