"""Targets as TVM 0.27 dicts, defaulting to the host CPU."""

from __future__ import annotations

import os

import tvm

from .errors import CoschedError


def host_cpu() -> str:
    """The LLVM name of this machine's CPU ("native" silently falls back to generic in 0.27)."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def cpu_features(cpu: str) -> frozenset[str]:
    """The instruction-set features LLVM knows CPU model ``cpu`` by; empty for a name it does not know."""
    if not tvm.target.codegen.llvm_is_valid_cpu(cpu, tvm.target.codegen.llvm_get_system_triple()):
        return frozenset()
    return frozenset(tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu})))


VECTOR_FEATURES = ("avx512f", "avx2", "avx", "sse4.2", "neon", "sve")
"""Vector instruction sets that decide which tilings and vector widths a tuned schedule was chosen for."""


def cpu_closeness(a: str, b: str) -> tuple[bool, float]:
    """How alike two CPU models are for a tuned schedule: whether they have the same vector instruction
    sets (``VECTOR_FEATURES``), then the share of all their features in common (Jaccard).
    ``(False, 0.0)`` for a name LLVM does not know."""
    fa, fb = cpu_features(a), cpu_features(b)
    if not fa or not fb:
        return False, 0.0
    return all((f in fa) == (f in fb) for f in VECTOR_FEATURES), len(fa & fb) / len(fa | fb)


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The host CPU as a dict target, with the core count MetaSchedule needs."""
    cores = num_cores or os.cpu_count() or 1
    return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), "num-cores": cores})


def as_target(target: str | dict | tvm.target.Target | None) -> tvm.target.Target:
    """Normalise the user's target argument; ``None`` is the host CPU."""
    if target is None:
        return host_target()
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) and target in ("llvm", "cpu"):
        return host_target()
    try:
        return tvm.target.Target(target)
    except Exception as err:  # TVM raises several types here
        raise CoschedError(
            f"invalid target {target!r}: {err}",
            hint='use a dict such as {"kind": "llvm", "mcpu": "sapphirerapids"} or "cuda"',
        ) from None


def target_key(target: tvm.target.Target) -> dict:
    """The parts of a target that decide whether tuned records apply to it."""
    attrs = {k: str(v) for k, v in target.attrs.items() if k in ("mcpu", "arch", "mattr")}
    return {"kind": target.kind.name, **attrs}
