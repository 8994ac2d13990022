"""One comparison run: cosched against its peers on the same models and inputs, in one process."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from . import bench
from .compiler import compile as compile_bundle
from .compiler import reschedule
from .errors import CoschedError
from .models import LIGHT_MODELS, light_model
from .search import SEARCHED_SCHEDULE, load_searched, sequential_schedule
from .target import as_target, cpu_closeness, host_cpu
from .tenant import Tenant, load_onnx

if TYPE_CHECKING:
    from tvm import relax

    from cosched.runtime import Bundle

REPO_DATABASES = Path(__file__).resolve().parents[2] / "databases"
DEFAULT_STRATEGIES = ("sequential", "round_robin", "breadth_first")
MIXES = {
    "demo": ("squeezenet", "shufflenet", "inception_v1"),
    "resnet_squeeze": ("resnet50", "squeezenet"),
    "dense_incv2_alex": ("densenet121", "inception_v2", "bvlc_alexnet"),
}
"""The benchmark mixes, by the name of their shipped database folder."""


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


def model_parser(description: str, repeat: int = 40) -> argparse.ArgumentParser:
    """Arguments of the scripts that time a mix's models one by one: --mix, --models, --threads, --repeat."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--models", nargs="*", default=None, help="a subset of the mix's models")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=repeat)
    return parser


def _databases_root() -> Path:
    env = os.environ.get("COSCHED_DATABASES")
    return Path(env) if env else REPO_DATABASES


def shipped_database(mix: str = "demo") -> Path | None:
    """The database shipped for this CPU and mix, if there is one."""
    path = _databases_root() / host_cpu() / mix
    return path if path.is_dir() else None


def nearest_database(mix: str = "demo") -> Path | None:
    """Another CPU's shipped database of ``mix``, of the CPU closest to this one (``cpu_closeness``)."""
    # A record is a schedule: one written for the same vector width and instructions replays best here.
    host = host_cpu()
    others = sorted(p for p in _databases_root().glob(f"*/{mix}") if p.parent.name != host)
    return max(others, key=lambda p: cpu_closeness(p.parent.name, host), default=None)


def tune_command(mix: str = "demo") -> str:
    """The command that tunes ``mix`` for this CPU, starting from another CPU's shipped database if any."""
    start = f" --start-from {other}" if (other := nearest_database(mix)) else ""
    return f"cosched tune {' '.join(MIXES[mix])} --work-dir databases/{host_cpu()}/{mix} --trials 32 --budget 20{start}"


def load_mix(mix: str) -> tuple[Path, dict[str, onnx.ModelProto], list[Tenant]]:
    """A benchmark mix's shipped database for this CPU, its models and their tenants."""
    database = shipped_database(mix)
    if database is None:
        raise CoschedError(
            f"no shipped database for mix {mix} on this CPU ({host_cpu()})",
            hint=f"tune it first: {tune_command(mix)}",
        )
    models = load_models(MIXES[mix])
    return database, models, [load_onnx(m, name=n) for n, m in models.items()]


def sequential_baselines(
    tenants: Sequence[Tenant], inputs, database: str | Path | None, threads: int
) -> tuple[Bundle, list[bench.Contender], dict[str, relax.VMExecutable]]:
    """The tenants compiled into one bundle, the two ways to run them one after another it is
    measured against: the Relax VM (``relax-vm-seq``) and the bundle's one-stream order
    (``cosched-sequential-1``), and the VM's executables (for more VM contenders without compiling
    again)."""
    target = as_target(None)
    exes = {t.name: bench.compile_tenant(t, target, database) for t in tenants}
    bundle = compile_bundle(list(tenants), target, database=database, cores=threads)
    one_stream = bundle.with_schedule(sequential_schedule(bundle.schedule))
    contenders = [
        bench.relax_vm_sequential(tenants, inputs, target, threads, executables=exes, measure_memory=False),
        cosched_contender("cosched-sequential-1", one_stream, inputs),
    ]
    return bundle, contenders, exes


def make_inputs(tenants: Sequence[Tenant], seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {t.name: {i.name: rng.standard_normal(i.shape).astype(i.dtype) for i in t.inputs} for t in tenants}


@dataclass
class ModelTiming:
    """One model alone: tuned TVM (Relax VM) and cosched (a bundle of that model) against ONNX
    Runtime at the same thread count, on the same kernels."""

    name: str
    tvm: bench.Result
    ort: bench.Result
    cosched: bench.Result

    @cached_property
    def ratio(self) -> bench.Speedup:
        """TVM time over ONNX Runtime time (<= 1: TVM is as fast or faster), with its interval."""
        return bench.speedup(self.tvm, self.ort)

    @cached_property
    def cosched_ratio(self) -> bench.Speedup:
        """cosched time over ONNX Runtime time (<= 1: cosched is as fast or faster), with its interval."""
        return bench.speedup(self.cosched, self.ort)


@dataclass
class Comparison:
    """Everything one comparison run produced."""

    header: str
    results: list[bench.Result]
    table: str
    bundles: dict[str, object] = field(default_factory=dict)
    baseline: str = "relax-vm-seq"
    per_model: list[ModelTiming] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """Header, the bundle table, each model alone and the headline ratios, as printed by ``cosched bench``."""
        parts = [self.header, self.table, self.per_model_table(), self.summary()]
        return "\n\n".join(p for p in parts if p)

    def per_model_table(self) -> str:
        """Each model alone: TVM vs ONNX Runtime medians and their ratio."""
        return format_models(self.per_model)

    def summary(self) -> str:
        """The bundle's headline ratios: the best cosched schedule against each way users run models today."""
        res = {r.name: r for r in self.results}
        by = {name: r.median_ms for name, r in res.items()}
        mine = {k: v for k, v in by.items() if k.startswith("cosched-")}
        if not mine:
            return ""
        best = min(mine, key=mine.get)
        fixed = {k: v for k, v in mine.items() if k != "cosched-search"}
        peers = {
            "cosched-sequential": "cosched sequential order",
            "relax-vm-seq": "TVM one model after another",
            "relax-vm-concurrent": "naive concurrency (a thread per model)",
            "ort-seq": "ONNX Runtime sequential",
            "ort-concurrent": "ONNX Runtime concurrent",
            "ort-seq-nospin": "ONNX Runtime sequential, no spinning",
            "ort-concurrent-nospin": "ONNX Runtime concurrent, no spinning",
        }
        gains: list[bench.Speedup] = []

        def over(base: str, this: str) -> str:
            gains.append(bench.speedup(res[base], res[this]))
            return f"{gains[-1]:x}"

        lines = [f"best cosched schedule: {best} ({by[best]:.2f} ms); speedup (>1: {best} faster) over"]
        lines += [f"  {text:<40} {over(k, best)}" for k, text in peers.items() if k in by]
        if "cosched-search" in by and fixed:
            top = min(fixed, key=fixed.get)
            lines.append(f"  cosched-search over best fixed ({top}): {over(top, 'cosched-search')}")
            if "relax-vm-seq" in by:
                lines.append(
                    f"  cosched-search over TVM one model after another: {over('relax-vm-seq', 'cosched-search')}"
                )
        orts = {k: v for k, v in by.items() if k.startswith("ort-")}
        if orts:
            top = min(orts, key=orts.get)
            lines.append(f"  best of ONNX Runtime ({top}): {over(top, best)}")
        if any(g.interval is not None for g in gains):
            lines.append("  (ratios of medians [95% bootstrap intervals, resampling the rounds])")
        return "\n".join(lines + self.notes)


def format_models(timings: Sequence[ModelTiming]) -> str:
    """A table of models timed alone: TVM (Relax VM), cosched and ONNX Runtime medians, and the
    ratios to ONNX Runtime with their intervals."""
    if not timings:
        return ""
    width = max(len("model"), *(len(m.name) for m in timings))
    head = f"{'model':<{width}}  {'TVM ms':>9}  {'cosched ms':>10}  {'ORT ms':>9}  {'TVM/ORT':>22}  {'cosched/ORT':>22}"
    rows = [head, "-" * len(head)]
    for m in timings:
        rows.append(
            f"{m.name:<{width}}  {m.tvm.median_ms:>9.2f}  {m.cosched.median_ms:>10.2f}  {m.ort.median_ms:>9.2f}"
            f"  {m.ratio:>22}  {m.cosched_ratio:>22}"
        )
    rows.append(
        f"each model alone, {timings[0].tvm.repeat} runs each, alternated in shuffled rounds; TVM and cosched"
        " run the same tuned kernels (cosched: a one-model bundle); <= 1: as fast as ONNX Runtime or faster"
    )
    if timings[0].ratio.interval is not None:
        rows.append("ratios of medians [95% bootstrap intervals, resampling the rounds]")
    return "\n".join(rows)


def _model_contenders(
    tenants, models, inputs, target, threads: int, exes, database: str | Path | None
) -> list[bench.Contender]:
    """Per tenant alone: tuned TVM (Relax VM), ONNX Runtime and cosched, at the same thread count."""
    alone = []
    for t in tenants:
        own = {t.name: inputs[t.name]}
        bundle = compile_bundle([t], target, database=database, cores=threads)
        alone += [
            bench.relax_vm_sequential(
                [t], own, target, threads, executables=exes, measure_memory=False, name=f"tvm:{t.name}"
            ),
            bench.ort_sequential({t.name: models[t.name]}, own, threads, measure_memory=False, name=f"ort:{t.name}"),
            cosched_contender(f"cosched:{t.name}", bundle.with_schedule(sequential_schedule(bundle.schedule)), own),
        ]
    return alone


def _model_timings(tenants, alone: list[bench.Contender], repeat: int, warmup: int) -> list[ModelTiming]:
    flat = bench.measure(alone, repeat=repeat, warmup=warmup)
    return [ModelTiming(t.name, *flat[3 * i : 3 * i + 3]) for i, t in enumerate(tenants)]


def time_models(
    models: dict[str, onnx.ModelProto],
    threads: int | None = None,
    database: str | Path | None = None,
    repeat: int = 10,
    warmup: int = 2,
) -> list[ModelTiming]:
    """Each model alone, tuned TVM and cosched against ONNX Runtime at the same thread count, all in
    alternating rounds."""
    threads = threads or os.cpu_count() or 1
    target = as_target(None)
    tenants = [load_onnx(m, name=n) for n, m in models.items()]
    inputs = make_inputs(tenants)
    exes = {t.name: bench.compile_tenant(t, target, database) for t in tenants}
    alone = _model_contenders(tenants, models, inputs, target, threads, exes, database)
    with bench.closing(alone):
        return _model_timings(tenants, alone, repeat, warmup)


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
    per_model: bool = True,
    searched: str | Path | None = None,
    log=print,
) -> Comparison:
    """Build every contender, check they agree, time them alternating, and tabulate ratios to the VM.

    ``searched``: a directory with a stored searched schedule (default: ``<database>/search``); when
    it fits these kernels it runs as ``cosched-search``. ``per_model`` also times each model alone on
    TVM and on ONNX Runtime (needs ``with_ort``).
    """
    threads = threads or os.cpu_count() or 1
    target = as_target(None)
    tenants = [load_onnx(m, name=n) for n, m in models.items()]
    inputs = make_inputs(tenants)
    log(f"compiling {len(tenants)} tenants for {target} ({'tuned: ' + str(database) if database else 'untuned'})")
    exes = {t.name: bench.compile_tenant(t, target, database) for t in tenants}
    contenders = [
        bench.relax_vm_sequential(tenants, inputs, target, threads, executables=exes),
        bench.relax_vm_concurrent(tenants, inputs, target, threads, executables=exes),
    ]
    first = compile_bundle(tenants, target, strategies[0], num_streams, database, cores=threads)
    bundles = {strategies[0]: first}
    for strategy in strategies[1:]:
        bundles[strategy] = reschedule(first, strategy, num_streams, cores=threads)
    notes = []
    if searched is None and database is not None:
        searched = Path(database) / "search"
    if searched is not None and (Path(searched) / SEARCHED_SCHEDULE).is_file():
        try:
            bundles["search"] = load_searched(first, searched)
        except CoschedError as err:
            notes.append(f"note: the stored searched schedule was not used: {err}")
    contenders += [cosched_contender(f"cosched-{s}", b, inputs) for s, b in bundles.items()]
    if with_ort:
        contenders += [bench.ort_sequential(models, inputs, threads), bench.ort_concurrent(models, inputs, threads)]
        # Each session has its own intra-op pool, which spins after a run (ONNX Runtime's default) and
        # slowed the next session: the demo mix one after another took 2.2x its models' times alone.
        # Without spinning is what a user running several sessions would pick: both are shown.
        contenders += [
            bench.ort_sequential(models, inputs, threads, spinning=False, name="ort-seq-nospin"),
            bench.ort_concurrent(models, inputs, threads, spinning=False, name="ort-concurrent-nospin"),
        ]
    alone = (
        _model_contenders(tenants, models, inputs, target, threads, exes, database) if per_model and with_ort else []
    )
    with bench.closing(contenders + alone):
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
        timings = []
        if alone:
            log(f"timing each model alone: {repeat} alternating rounds")
            timings = _model_timings(tenants, alone, repeat, warmup)
    head = (
        bench.header(threads, target)
        + f"\nmodels  : {', '.join(models)}; streams: "
        + ", ".join(f"{s}={b.schedule.num_streams}" for s, b in bundles.items())
    )
    table = bench.format_table(results, "relax-vm-seq")
    return Comparison(header=head, results=results, table=table, bundles=bundles, per_model=timings, notes=notes)
