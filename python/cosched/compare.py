"""One comparison run: cosched against its peers on the same models and inputs, in one process."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import bench
from .compiler import compile as compile_bundle
from .compiler import reschedule
from .errors import CoschedError
from .models import LIGHT_MODELS, light_model
from .target import as_target, host_cpu
from .tenant import Tenant, load_onnx

REPO_DATABASES = Path(__file__).resolve().parents[2] / "databases"
DEFAULT_STRATEGIES = ("sequential", "round_robin", "breadth_first")


def load_models(specs: Sequence[str], seed: int = 0) -> dict[str, onnx.ModelProto]:
    """Models by light-model name (seeded random weights) or .onnx path; names made unique."""
    models: dict[str, onnx.ModelProto] = {}
    for spec in specs:
        if spec in LIGHT_MODELS:
            name, model = spec, light_model(spec, seed=seed)
        else:
            path = Path(spec)
            if not path.exists():
                raise CoschedError(
                    f"no such model file or light model name: {spec}",
                    tenant=path.stem,
                    hint=f"use a .onnx path or one of {', '.join(LIGHT_MODELS)}",
                )
            name = path.stem
            try:
                model = onnx.load(str(path))
            except Exception as err:
                raise CoschedError(
                    f"{path} is not a valid ONNX file: {err}", tenant=name, hint="re-export the model"
                ) from None
        base, i = name, 2
        while name in models:  # the same model twice is a legitimate mix (two tenants)
            name, i = f"{base}_{i}", i + 1
        models[name] = model
    return models


def shipped_database(mix: str = "demo") -> Path | None:
    """The database shipped for this CPU and mix, if there is one."""
    env = os.environ.get("COSCHED_DATABASES")
    root = Path(env) if env else REPO_DATABASES
    path = root / host_cpu() / mix
    return path if path.is_dir() else None


def make_inputs(tenants: Sequence[Tenant], seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {t.name: {i.name: rng.standard_normal(i.shape).astype(i.dtype) for i in t.inputs} for t in tenants}


@dataclass
class Comparison:
    """Everything one comparison run produced."""

    header: str
    results: list[bench.Result]
    table: str
    bundles: dict[str, object] = field(default_factory=dict)
    baseline: str = "relax-vm-seq"


def cosched_contender(name: str, bundle, inputs) -> bench.Contender:
    last: dict = {}

    def run() -> None:
        last["out"] = bundle.run(inputs)

    return bench.Contender(
        name=name, run=run, memory_bytes=bundle.planned_bytes, memory_source="planned", outputs=lambda: last["out"]
    )


def compare(
    models: dict[str, onnx.ModelProto],
    threads: int | None = None,
    database: str | Path | None = None,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    num_streams: int | None = None,
    repeat: int = 10,
    warmup: int = 2,
    with_ort: bool = True,
    log=print,
) -> Comparison:
    """Build every contender, check they agree, time them alternating, and tabulate ratios to the VM."""
    threads = threads or os.cpu_count() or 1
    target = as_target(None)
    tenants = [load_onnx(m, name=n) for n, m in models.items()]
    inputs = make_inputs(tenants)
    log(f"compiling {len(tenants)} tenants for {target} ({'tuned: ' + str(database) if database else 'untuned'})")
    contenders = [
        bench.relax_vm_sequential(tenants, inputs, target, threads, database),
        bench.relax_vm_concurrent(tenants, inputs, target, threads, database),
    ]
    first = compile_bundle(tenants, target, strategies[0], num_streams, database, cores=threads)
    bundles = {strategies[0]: first}
    for strategy in strategies[1:]:
        bundles[strategy] = reschedule(first, strategy, num_streams, cores=threads)
    contenders += [cosched_contender(f"cosched-{s}", b, inputs) for s, b in bundles.items()]
    if with_ort:
        contenders += [bench.ort_sequential(models, inputs, threads), bench.ort_concurrent(models, inputs, threads)]
    try:
        reference = contenders[0].run_once()
        for c in contenders[1:]:
            got = c.run_once()
            for tenant, outs in reference.items():
                for a, b in zip(outs, got[tenant], strict=True):
                    rtol = 1e-5 if c.name.startswith("cosched") else 1e-3
                    if not np.allclose(a, b.reshape(a.shape), rtol=rtol, atol=1e-6):
                        raise CoschedError(
                            f"{c.name} disagrees with {contenders[0].name}",
                            tenant=tenant,
                            hint="this is a bug: please report it with the models used",
                        )
        log(f"outputs agree across {len(contenders)} contenders; timing {repeat} alternating rounds")
        results = bench.measure(contenders, repeat=repeat, warmup=warmup)
    finally:
        for c in contenders:
            if c.close is not None:
                c.close()
    head = (
        bench.header(threads, target)
        + f"\nmodels  : {', '.join(models)}; streams: "
        + ", ".join(f"{s}={b.schedule.num_streams}" for s, b in bundles.items())
    )
    table = bench.format_table(results, "relax-vm-seq")
    return Comparison(header=head, results=results, table=table, bundles=bundles)
