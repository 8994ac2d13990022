"""Learned co-schedule search: an XGBoost cost model over schedule features guides an evolutionary search.

Candidates are edits of the schedule IR (issue order, stream of each kernel, number of streams, core
split per stream) over the *same* compiled kernels, so trying one costs a measurement, not a build.
Kernels are profiled alone at one thread and at the full budget, and in a group (every tenant on its
own stream, all running together) for the slowdown co-running kernels cause each other; a simulator
replays a candidate on those profiles, and its results plus structural counts are the features. The model learns the
measured latency (relative to the sequential schedule, measured in the same alternating batch, which
cancels machine drift) and ranks candidates; only the top few are measured. The best *measured*
schedule wins if it is faster than the sequential schedule beyond the measurement's 95% interval;
otherwise the sequential schedule does, so the result is never slower than it on measurement.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import CoschedError
from .schedule import Schedule, Stream, assign_waits

NUM_FEATURES = 23
FEATURE_VERSION = 3
"""3: idle cores join running kernels' loops (cosched's parallel launcher), co-running slowdown only
while kernels overlap; 2: the simulator grants cores as the runtime does and counts other streams'
spinning pool workers; 1 scaled every kernel by the streams' oversubscription."""
MAX_STREAMS = 4
SEARCHED_SCHEDULE = "searched_schedule.json"
"""The file in a search's ``work_dir`` that holds the winning schedule."""
SETTLE_S = 0.3
"""Least idle pause before each measured run; it lasts until the process is idle (see ``_measure_results``)."""


@dataclass
class KernelProfile:
    """Latency (us) of each kernel alone, at one thread and at the whole core budget, and its bytes;
    ``shared``: at one thread while the other tenants' kernels run on their own streams."""

    one: dict[int, float]
    full: dict[int, float]
    nbytes: dict[int, int]
    shared: dict[int, float] = field(default_factory=dict)

    def slowdown(self, kernel: int) -> float:
        """How much co-running tenants slow this kernel down (memory bandwidth, caches); 1 if unprofiled."""
        if kernel not in self.shared or self.one.get(kernel, 0.0) <= 0.0:
            return 1.0
        return float(np.clip(self.shared[kernel] / self.one[kernel], 1.0, 4.0))

    def speedup_bound(self, cores: int) -> float:
        """The most any schedule on ``cores`` cores could gain over running every kernel on all of them,
        one after another, if each kernel runs either on all cores or on one core beside the others
        (at its measured co-running speed), the cores perfectly packed and no wait ever stalling.

        An estimate from kernels timed back to back, not a hard limit: it misses what overlapping
        saves beyond that (e.g. one tenant's cold weights loading while another computes)."""
        full = sum(self.full.values())
        if cores <= 1 or full <= 0.0:
            return 1.0
        # Core-time: a kernel on all cores occupies them all; one on one core, only that one.
        core_time = sum(min(cores * self.full[k], self.shared.get(k, self.one[k])) for k in self.full)
        return cores * full / core_time

    def latency(self, kernel: int, threads: int, cores: int) -> float:
        if threads >= cores or cores <= 1:
            return self.full[kernel]
        # Interpolate in 1/threads between the two measured points (Amdahl-like).
        frac = (1 / threads - 1 / cores) / (1 - 1 / cores)
        return self.full[kernel] + frac * (self.one[kernel] - self.full[kernel])


@dataclass
class Candidate:
    schedule: Schedule
    origin: str
    features: np.ndarray | None = None
    predicted: float | None = None
    measured: float | None = None  # latency relative to the sequential schedule (< 1 is faster)
    measured_ms: float | None = None


@dataclass
class SearchReport:
    """What the search did: candidates measured, their predicted and measured latency, the winner."""

    best: Candidate
    sequential_ms: float
    fixed: dict[str, float]  # fixed strategies' measured latency relative to sequential
    measured: list[Candidate] = field(default_factory=list)
    rank_correlation: float | None = None
    seconds: float = 0.0
    speedup_bound: float | None = None  # KernelProfile.speedup_bound for the bundle's cores
    best_interval: tuple[float, float] | None = None  # 95% interval of best.measured in the confirming round
    confirmed: list[tuple[str, float]] = field(default_factory=list)  # the confirming round: (origin, ratio)

    def summary(self) -> str:
        interval = ""
        if self.best_interval is not None:
            interval = f" [{self.best_interval[0]:.3f}-{self.best_interval[1]:.3f}, 95% bootstrap]"
        lines = [
            f"search: {len(self.measured)} schedules measured in {self.seconds:.0f} s; "
            f"winner '{self.best.origin}' at {self.best.measured:.3f}x{interval} the sequential latency "
            f"({self.sequential_ms:.2f} ms)",
        ]
        for name, rel in sorted(self.fixed.items(), key=lambda kv: kv[1]):
            lines.append(f"  fixed {name:<28} {rel:.3f}x")
        if self.rank_correlation is not None:
            lines.append(
                f"  cost model rank correlation (predicted vs measured, Spearman): {self.rank_correlation:.2f}"
            )
        if self.confirmed:
            lines.append("  confirmed side by side: " + ", ".join(f"{o} {r:.3f}x" for o, r in self.confirmed))
        if self.speedup_bound is not None:
            lines.append(
                f"  kernel profile's estimate of the most any schedule gains over sequential: {self.speedup_bound:.2f}x"
            )
        return "\n".join(lines)


# -- schedule IR edits ----------------------------------------------------------------------------
def rebuild(
    schedule: Schedule, issue: list[int], stream_of: dict[int, int], threads: list[int], origin: str
) -> Schedule:
    """A schedule with the given issue order, streams and core split; orders and minimal waits recomputed."""
    by_id = {k.id: k for k in schedule.kernels}
    kernels = [copy.copy(by_id[i]) for i in issue]
    counters = [0] * len(threads)
    for k in kernels:
        k.stream = stream_of[k.id]
        k.order = counters[k.stream]
        counters[k.stream] += 1
    deps = schedule.dependencies()
    assign_waits(kernels, deps, len(threads))
    return Schedule(
        kernels=kernels,
        buffers=schedule.buffers,
        tenants=schedule.tenants,
        streams=[Stream(i, t) for i, t in enumerate(threads)],
        strategy=origin,
        policy="search",
        cores=schedule.cores,
    )


def static_splits(cores: int, streams: int) -> list[list[int]]:
    """Ways to give each stream at least one thread, summing to the budget (or one each if fewer cores)."""
    if streams >= cores:
        return [[1] * streams]
    if streams == 1:
        return [[cores]]
    out = []
    for first in range(1, cores - streams + 2):
        out += [[first, *rest] for rest in static_splits(cores - first, streams - 1)]
    return out


def thread_splits(cores: int, streams: int) -> list[list[int]]:
    """Per-stream core caps to try: shared (every stream may use the whole budget), then static splits."""
    shared = [cores] * streams
    return [shared] + [s for s in static_splits(cores, streams) if s != shared]


def mutate(schedule: Schedule, rng: random.Random) -> tuple[list[int], dict[int, int], list[int]]:
    """One random edit of a schedule, as ``rebuild``'s issue order, streams and core caps: a kernel
    moved within its dependencies, a run of a tenant's kernels to another stream, a new core split or
    a new number of streams."""
    issue = [k.id for k in schedule.kernels]
    stream_of = {k.id: k.stream for k in schedule.kernels}
    threads = [s.threads for s in schedule.streams]
    deps = schedule.dependencies()
    users: dict[int, list[int]] = {}
    for k, ds in deps.items():
        for d in ds:
            users.setdefault(d, []).append(k)
    move = rng.random()
    if move < 0.4:  # move one kernel within the window its dependencies allow
        pos = {k: i for i, k in enumerate(issue)}
        k = rng.choice(issue)
        lo = max((pos[d] for d in deps[k]), default=-1) + 1
        hi = min((pos[u] for u in users.get(k, [])), default=len(issue)) - 1
        if hi > lo:
            issue.remove(k)
            issue.insert(rng.randint(lo, hi), k)
    elif move < 0.7:  # move a run of one tenant's kernels to another stream
        k = rng.choice(issue)
        tenant = next(x.tenant for x in schedule.kernels if x.id == k)
        target = rng.randrange(len(threads))
        same = [x.id for x in schedule.kernels if x.tenant == tenant]
        start = same.index(k)
        for x in same[start : start + rng.randint(1, max(1, len(same) // 3))]:
            stream_of[x] = target
    elif move < 0.85:  # change the core split
        threads = rng.choice(thread_splits(schedule.cores, len(threads)))
    else:  # change the number of streams
        n = rng.randint(1, MAX_STREAMS)
        stream_of = {k: s % n for k, s in stream_of.items()}
        threads = rng.choice(thread_splits(schedule.cores, n))
    used = sorted(set(stream_of.values()))
    remap = {s: i for i, s in enumerate(used)}  # drop empty streams
    if len(used) != len(threads):
        threads = rng.choice(thread_splits(schedule.cores, len(used)))
    return issue, {k: remap[s] for k, s in stream_of.items()}, threads


# -- features -----------------------------------------------------------------------------------------
def simulate(schedule: Schedule, profile: KernelProfile, joining: bool = True) -> dict[str, float]:
    """Replay a schedule on profiled latencies the way the CPU runtime grants cores: makespan,
    per-stream busy time, overlap.

    Each stream's next kernel starts once its waits are done and a core is free; it takes the free
    cores up to its stream's cap, leaving one to every other stream that is ready and holds none, and
    keeps them until it ends (``runtime/src/executor.cc``, ``Acquire``). While another kernel runs
    beside it, a kernel granted part of the budget runs at its co-running speed
    (``KernelProfile.slowdown``). ``joining`` (``Bundle.loops_on_helpers``): cores nobody holds help
    the running kernels granted fewer cores, shared evenly, until a stream is granted them
    (``joined``: core time so lent). Otherwise, ``spin_exposed``: kernel time times the other
    streams' TVM pool workers that spin beside it (their speed cost is the model's to learn).
    """
    cores = max(schedule.cores, 1)
    threads = {s.id: s.threads for s in schedule.streams}
    queues: dict[int, list] = {s: [] for s in threads}
    for k in schedule.kernels:
        queues[k.stream].append(k)
    nxt = dict.fromkeys(threads, 0)
    holding = dict.fromkeys(threads, 0)
    running: dict[int, list] = {}  # stream -> [kernel, fraction of its work left, start time]
    finish: dict[int, float] = {}
    spans = []
    now, free = 0.0, cores
    # Pool workers a stream's kernels have woken: TVM's pools are per thread and yield-spin ~100 ms
    # (longer than most runs) after a parallel kernel, on cores the runtime counts as free.
    pool = dict.fromkeys(threads, 0)
    spin_exposed = joined = 0.0

    def ready(s: int) -> bool:
        if holding[s] or nxt[s] >= len(queues[s]):
            return False
        return all(w in finish and finish[w] <= now for w in queues[s][nxt[s]].waits)

    while len(finish) < len(schedule.kernels):
        for s in threads:  # streams that can start a kernel now, in stream order
            if free < 1 or not ready(s):
                continue
            others = sum(1 for o in threads if o != s and ready(o))
            granted = max(1, min(threads[s], free - others))
            k = queues[s][nxt[s]]
            free -= granted
            holding[s] = granted
            running[s] = [k, 1.0, now]
            if not joining:
                spinning = sum(pool[o] for o in threads if o != s and holding[o] <= 1)
                spin_exposed += profile.latency(k.id, granted, cores) * spinning
                pool[s] = max(pool[s], granted - 1)
        if not running:
            raise CoschedError("schedule cannot be simulated: a kernel waits on one that never runs")
        open_loops = [s for s in running if holding[s] < cores] if joining else []
        lent = free / len(open_loops) if open_loops else 0.0
        rates = {}
        for s, state in running.items():
            k = state[0]
            extra = lent if s in open_loops else 0.0
            dur = profile.latency(k.id, holding[s] + extra, cores)
            if holding[s] < cores and len(running) > 1:
                dur *= profile.slowdown(k.id)
            rates[s] = 1.0 / max(dur, 1e-9)
        step = min(state[1] / rates[s] for s, state in running.items())
        now += step
        joined += step * lent * len(open_loops)
        for s in list(running):
            state = running[s]
            state[1] -= step * rates[s]
            if state[1] > 1e-9:
                continue
            k, _, began = running.pop(s)
            finish[k.id] = now
            spans.append((began, now, profile.nbytes[k.id] / max(now - began, 1e-3)))
            free += holding[s]
            holding[s] = 0
            nxt[s] += 1
    makespan = max(finish.values(), default=0.0)
    busy = sorted(
        (sum(profile.latency(k.id, threads[s], cores) for k in schedule.kernels if k.stream == s) for s in threads),
        reverse=True,
    )
    # Time with two or more kernels running, and the bandwidth they demand together (memory-bound pairs hurt).
    points = sorted([(s, 1, bw) for s, _, bw in spans] + [(e, -1, bw) for _, e, bw in spans])
    active, demand, last, overlap, overlap_bw = 0, 0.0, 0.0, 0.0, 0.0
    for t, delta, bw in points:
        if active >= 2:
            overlap += t - last
            overlap_bw += (t - last) * demand
        active += delta
        demand += delta * bw
        last = t
    # The interference the pair/group profile predicts for this schedule, weighted by kernel time.
    multi = len(threads) > 1
    weights = [profile.latency(k.id, threads[k.stream], cores) for k in schedule.kernels]
    slow = [profile.slowdown(k.id) if multi else 1.0 for k in schedule.kernels]
    interference = float(np.average(slow, weights=weights)) if sum(weights) > 0 else 1.0
    return {
        "makespan": makespan,
        "busy": busy,
        "overlap": overlap,
        "overlap_bw": overlap_bw,
        "interference": interference,
        "spin_exposed": spin_exposed,
        "joined": joined,
    }


def features(schedule: Schedule, profile: KernelProfile, joining: bool = True) -> np.ndarray:
    """A fixed-length feature vector for the cost model (times relative to the sequential work)."""
    sim = simulate(schedule, profile, joining)
    work_full = sum(profile.full.values()) or 1.0
    work_one = sum(profile.one.values()) or 1.0
    threads = sorted((s.threads for s in schedule.streams), reverse=True)
    busy = [b / work_full for b in sim["busy"]]
    waits = sum(len(k.waits) for k in schedule.kernels)
    switches = sum(1 for a, b in zip(schedule.kernels, schedule.kernels[1:], strict=False) if a.tenant != b.tenant)
    vec = [
        schedule.num_streams,
        sum(threads) / max(schedule.cores, 1),
        waits / max(len(schedule.kernels), 1),
        switches / max(len(schedule.kernels), 1),
        sim["makespan"] / work_full,
        sim["overlap"] / work_full,
        sim["overlap_bw"] / max(work_full * max(profile.nbytes.values(), default=1), 1.0),
        work_one / work_full,
        *(busy + [0.0] * MAX_STREAMS)[:MAX_STREAMS],
        *(threads + [0] * MAX_STREAMS)[:MAX_STREAMS],
        len({k.tenant for k in schedule.kernels}),
        max(busy, default=0.0),
        min(busy, default=0.0),
        len(schedule.kernels) / 100.0,
        sim["interference"],
        sim["spin_exposed"] / work_full,
        sim["joined"] / work_full,
    ]
    return np.asarray(vec, dtype=np.float64)


# -- the cost model -------------------------------------------------------------------------------------
class CostModel:
    """XGBoost regressor from schedule features to latency relative to the sequential schedule."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.x: list[list[float]] = []
        self.y: list[float] = []
        self.booster = None
        if self.path and self.path.exists():
            data = json.loads(self.path.read_text())
            # Samples with another feature set (an older cosched) cannot train this model: start afresh.
            if data.get("num_features") == NUM_FEATURES and data.get("feature_version") == FEATURE_VERSION:
                self.x, self.y = data["x"], data["y"]
                self.fit()

    def add(self, x: np.ndarray, y: float) -> None:
        self.x.append([float(v) for v in x])
        self.y.append(float(y))

    def fit(self) -> None:
        if len(self.y) < 4:
            return
        import xgboost as xgb

        dtrain = xgb.DMatrix(np.asarray(self.x), label=np.asarray(self.y))
        params = {"max_depth": 4, "eta": 0.2, "objective": "reg:squarederror", "nthread": 1, "verbosity": 0}
        self.booster = xgb.train(params, dtrain, num_boost_round=60)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted relative latency; before there is enough data, the simulator's makespan stands in."""
        x = np.atleast_2d(x)
        if self.booster is None:
            return x[:, 4] / np.maximum(x[:, 4].max(), 1e-9)
        import xgboost as xgb

        return self.booster.predict(xgb.DMatrix(x))

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"x": self.x, "y": self.y, "num_features": NUM_FEATURES, "feature_version": FEATURE_VERSION})
            )
            tmp.replace(self.path)


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


# -- measuring ----------------------------------------------------------------------------------------
def profile_kernels(bundle, inputs, repeat: int = 3) -> KernelProfile:
    """Each kernel's latency alone (sequential order, one stream) at one thread and at the full budget,
    and in a group: at one thread with every tenant on its own stream, all running together."""
    base = bundle.schedule
    issue = [k.id for k in base.kernels]
    tenant_stream = {t.name: i for i, t in enumerate(base.tenants)}
    layouts = {
        "one": ({k: 0 for k in issue}, [1]),
        "full": ({k: 0 for k in issue}, [base.cores]),
        "shared": ({k.id: tenant_stream[k.tenant] for k in base.kernels}, [1] * len(base.tenants)),
    }
    if len(base.tenants) < 2 or base.cores < 2:
        del layouts["shared"]  # nothing runs beside a kernel: no interference to measure
    result = {"shared": {}}
    for label, (stream_of, threads) in layouts.items():
        sched = rebuild(base, issue, stream_of, threads, "profile")
        b = bundle.with_schedule(sched)
        if label != "full":
            # A stream capped at one core must run on one: cosched's helpers would join its loops
            # on the idle core (ResNet-50's kernels timed 48.9 ms at "one" and 48.5 ms at "full").
            b.parallel = "tvm"
        runs = [b.profile(inputs, warmup=1 if r == 0 else 0) for r in range(repeat)]
        result[label] = {
            e.kernel: float(np.median([r.events[i].end_us - r.events[i].start_us for r in runs]))
            for i, e in enumerate(runs[0].events)
        }
    nbytes = {k.id: base.kernel_bytes(k) for k in base.kernels}
    return KernelProfile(result["one"], result["full"], nbytes, result["shared"])


def measure(
    bundle,
    schedules: list[Schedule],
    inputs,
    repeat: int = 5,
    settle_s: float = SETTLE_S,
    copies: int = 1,
    quiet: bool = True,
) -> list[float]:
    """Median latency (ms) of each schedule, runs alternated across schedules.

    The first schedule is the reference of the others' ratios: with ``copies`` > 1 it runs
    as ``copies`` separately built bundles, and its median is over all their samples. ``quiet``:
    pause until the process is idle after ``settle_s`` (``bench.measure``).
    """
    return [r.median_ms for r in _measure_results(bundle, schedules, inputs, repeat, settle_s, copies, quiet)]


def _measure_results(
    bundle,
    schedules: list[Schedule],
    inputs,
    repeat: int,
    settle_s: float = SETTLE_S,
    copies: int = 1,
    quiet: bool = True,
) -> list:
    """``measure``, as ``bench.Result`` objects (the reference's holds every copy's samples)."""
    from . import bench

    copies = max(1, copies)
    bundles = [bundle.with_schedule(schedules[0]) for _ in range(copies)]
    bundles += [bundle.with_schedule(s) for s in schedules[1:]]
    contenders = [bench.Contender(name=str(i), run=lambda b=b: b.run(inputs)) for i, b in enumerate(bundles)]
    # One warm-up round starts workers and workspaces. Each schedule has its own workers, and the
    # previous one's thread pools spin 0.2-0.45 s after a run: six copies of one schedule measured
    # 1.25-1.40x apart with a fixed 0.1 s pause, 1.07-1.12x with 0.3 s (benchmarks/search_noise.py),
    # and a fixed pause made several streams look faster than sequential (search_features.py), so
    # the pause lasts until the process is idle (bench.settle).
    results = bench.measure(contenders, repeat=repeat, warmup=1, settle_s=settle_s, quiet=quiet)
    if copies == 1:
        return results
    reference = bench.Result.from_samples("reference", [t for r in results[:copies] for t in r.samples_ms])
    return [reference, *results[copies:]]


def seeds(bundle) -> list[Candidate]:
    """The fixed strategies and policies over 1..min(#tenants+1, 4) streams, as starting candidates."""
    from .compiler import schedule_module
    from .extract import extract_schedule

    if bundle.ir is None:
        raise CoschedError("search needs a compiled bundle (with IR)", hint="use cosched.compile, not runtime.load")
    cores = bundle.schedule.cores
    tenants = len(bundle.tenants)
    out = []
    for strategy in ("sequential", "round_robin", "breadth_first"):
        for streams in range(1, min(tenants + 1, MAX_STREAMS) + 1):
            for policy in ("tenant", "balanced") if streams > 1 else ("tenant",):
                if policy == "tenant" and streams > tenants:
                    continue
                sched, _ = extract_schedule(schedule_module(bundle.ir, strategy, streams, policy, cores))
                out.append(Candidate(sched, f"{strategy}/{policy}/{streams}"))
    return out


def search(
    bundle,
    inputs,
    generations: int = 3,
    population: int = 24,
    measure_top: int = 4,
    explore: int = 2,
    repeat: int = 5,
    confirm: int = 3,
    reference_copies: int = 3,
    model_path: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    incumbent: Schedule | None = None,
) -> SearchReport:
    """Search the co-schedule of a compiled bundle; returns the report with the best measured schedule.

    Round 0 measures the fixed strategies; each of ``generations`` rounds mutates the best measured
    schedules into ``population`` children, measures the ``measure_top`` the model ranks best plus
    ``explore`` random ones, and retrains the model. The ``confirm`` best are then measured again
    side by side with the sequential schedule; the fastest there of those faster than sequential beyond
    their 95% interval wins, else the sequential schedule.
    ``incumbent`` (a schedule stored by an earlier search) is measured in round 0 and always among
    those, so a new winner has to beat it side by side.
    Every ratio is to the sequential schedule in the same batch, run as ``reference_copies`` bundles.
    """
    from . import bench

    start = time.time()
    rng = random.Random(seed)
    log = log or (lambda _msg: None)
    profile = profile_kernels(bundle, inputs)
    joining = bundle.loops_on_helpers
    model = CostModel(model_path)
    sequential = sequential_schedule(bundle.schedule)
    pool = seeds(bundle)
    stored = None
    if incumbent is not None:
        stored = Candidate(incumbent, "stored")
        pool.append(stored)
    for c in pool:
        c.features = features(c.schedule, profile, joining)
    measured: list[Candidate] = []

    def run_batch(batch: list[Candidate]) -> float:
        # The reference's error moves every ratio of the batch, and with it the model's targets. Three
        # copies did not remove the spread: the reference's own schedule measured 0.83-1.44x a one-copy
        # reference and 0.93-1.30x a three-copy one, hence the final round below.
        times = measure(bundle, [sequential] + [c.schedule for c in batch], inputs, repeat, copies=reference_copies)
        for c, t in zip(batch, times[1:], strict=True):
            c.measured_ms = t
            c.measured = t / times[0]
            model.add(c.features, c.measured)
            measured.append(c)
        model.fit()
        return times[0]

    # Round 0: all fixed strategies, so the model starts from real data and the report can compare.
    seq_ms = [run_batch(pool)]
    fixed = {c.origin: c.measured for c in pool if c is not stored}
    log(f"measured {len(fixed)} fixed schedules; best {min(fixed.values()):.3f}x sequential")
    for gen in range(generations):
        parents = sorted(measured, key=lambda c: c.measured)[: max(4, measure_top)]
        children = []
        for _ in range(population):
            parent = rng.choice(parents)
            issue, stream_of, threads = mutate(parent.schedule, rng)
            child = Candidate(
                rebuild(parent.schedule, issue, stream_of, threads, f"gen{gen}<-{parent.origin}"),
                f"gen{gen}<-{parent.origin}",
            )
            child.features = features(child.schedule, profile, joining)
            children.append(child)
        preds = model.predict(np.stack([c.features for c in children]))
        for c, p in zip(children, preds, strict=True):
            c.predicted = float(p)
        ranked = sorted(children, key=lambda c: c.predicted)
        # A few random children besides the model's picks: they keep the model honest (and its rank
        # correlation meaningful), as the picks alone span only the predicted-best corner.
        batch = ranked[:measure_top] + rng.sample(ranked[measure_top:], min(explore, len(ranked) - measure_top))
        seq_ms.append(run_batch(batch))
        log(
            f"generation {gen}: measured {len(batch)} of {len(children)}; "
            f"best so far {min(c.measured for c in measured):.3f}x sequential"
        )
    model.save()
    scored = [c for c in measured if c.predicted is not None]
    rho = spearman([c.predicted for c in scored], [c.measured for c in scored])
    # The best of many noisy measurements is biased low (winner's curse): the top few are measured
    # again, together, with twice the runs, and the winner is picked from that round alone.
    finalists = sorted(measured, key=lambda c: c.measured)[:confirm]
    if stored is not None and all(c is not stored for c in finalists):
        finalists.append(stored)  # a new winner has to beat the stored one side by side
    results = _measure_results(
        bundle, [sequential] + [c.schedule for c in finalists], inputs, 2 * repeat, copies=reference_copies
    )
    times = [r.median_ms for r in results]
    seq_ms.append(times[0])
    gains = [bench.speedup(results[0], r) for r in results[1:]]
    # Ratios of one round spread ~10% on a busy machine, more than most schedules differ: a finalist
    # wins only if it is faster than sequential beyond its 95% interval, else sequential stays.
    sure = [i for i, g in enumerate(gains) if g.interval is not None and g.low > 1.0]
    log(f"confirmed {len(finalists)} finalists; {len(sure)} faster than sequential beyond their interval")
    if sure:
        i = min(sure, key=lambda j: times[1 + j])
        best = replace(finalists[i], measured=times[1 + i] / times[0], measured_ms=times[1 + i])
        interval = (1.0 / gains[i].high, 1.0 / gains[i].low)
    else:
        best = Candidate(sequential, "sequential/1 stream", measured=1.0, measured_ms=times[0])
        interval = None
    return SearchReport(
        best=best,
        sequential_ms=float(np.median(seq_ms)),
        fixed=fixed,
        measured=measured,
        rank_correlation=rho,
        seconds=time.time() - start,
        speedup_bound=profile.speedup_bound(bundle.schedule.cores),
        best_interval=interval,
        confirmed=[(c.origin, t / times[0]) for c, t in zip(finalists, times[1:], strict=True)],
    )


def sequential_schedule(schedule: Schedule) -> Schedule:
    """The reference every candidate is measured against: tenants one after another, one stream, all cores."""
    issue = [k.id for k in _sequential_order(schedule)]
    return rebuild(schedule, issue, {k.id: 0 for k in schedule.kernels}, [schedule.cores], "sequential/1 stream")


def _sequential_order(schedule: Schedule):
    order = {t.name: i for i, t in enumerate(schedule.tenants)}
    return sorted(schedule.kernels, key=lambda k: (order[k.tenant], k.id))


def searched_bundle(bundle, inputs=None, work_dir: str | Path | None = None, **options):
    """Search a compiled bundle's co-schedule and return (bundle with the winner, report).

    With ``work_dir``, the cost model (``cost_model.json``) is kept there across runs and the winning
    schedule is stored as ``searched_schedule.json``; one stored by an earlier search for these kernels
    is the ``incumbent`` the new winner has to beat.
    """
    if inputs is None:
        inputs = bundle.random_inputs()
    model_path = Path(work_dir) / "cost_model.json" if work_dir else None
    if work_dir and "incumbent" not in options:
        try:
            stored = _stored_schedule(bundle, work_dir)
        except CoschedError:
            pass  # none, or for other kernels: nothing to beat
        else:
            # Over this bundle's own buffers, with waits recomputed, as the search builds candidates.
            streams = {k.id: k.stream for k in stored.kernels}
            caps = [st.threads for st in stored.streams]
            options["incumbent"] = rebuild(bundle.schedule, [k.id for k in stored.kernels], streams, caps, "stored")
    report = search(bundle, inputs, model_path=model_path, **options)
    result = _applied(bundle, report.best.schedule)
    if work_dir:
        result.schedule.save(Path(work_dir) / SEARCHED_SCHEDULE)
    return result, report


def _applied(bundle, schedule: Schedule):
    """The bundle's kernels under ``schedule``, written into its IR (so the IR shows what runs)."""
    from cosched.passes import ApplySchedule

    from .extract import extract_schedule

    mod = ApplySchedule(schedule)(bundle.ir)
    extracted, params = extract_schedule(mod)
    return replace(bundle.artifact, schedule=extracted, params=params, ir=mod).load()


def load_searched(bundle, work_dir: str | Path):
    """The compiled bundle under the schedule a search stored in ``work_dir``, without searching again.

    Raises ``CoschedError`` when there is none, or when it was searched for other kernels or another
    core budget (search again then).
    """
    return _applied(bundle, _stored_schedule(bundle, work_dir))


def _stored_schedule(bundle, work_dir: str | Path) -> Schedule:
    """The schedule a search stored in ``work_dir``, checked against the bundle (``load_searched``)."""
    path = Path(work_dir) / SEARCHED_SCHEDULE
    if not path.is_file():
        raise CoschedError(f"no searched schedule in {work_dir}", hint="run cosched tune --schedule first")
    if bundle.ir is None:
        raise CoschedError("a stored schedule applies to a compiled bundle (with IR)", hint="use cosched.compile")
    stored = Schedule.load(path)
    names = [t.name for t in bundle.schedule.tenants]
    if [t.name for t in stored.tenants] != names:
        raise CoschedError(
            f"{path} was searched for tenants {[t.name for t in stored.tenants]}, this bundle has {names}",
            hint="search again for these tenants",
        )
    if stored.cores != bundle.schedule.cores:
        raise CoschedError(
            f"{path} was searched for {stored.cores} cores, this bundle has {bundle.schedule.cores}",
            hint="search again with this core budget",
        )
    if _signature(stored) != _signature(bundle.schedule):
        raise CoschedError(
            f"{path} was searched for other kernels (the models or their tuning changed)",
            hint="search again: cosched tune --schedule",
        )
    return stored


def _signature(schedule: Schedule) -> dict[int, tuple]:
    """What a schedule must agree on to apply to a module: each kernel's function and argument shapes."""
    buffers = {b.id: b for b in schedule.buffers}
    return {
        k.id: (k.func, k.tenant, tuple((tuple(buffers[a].shape), buffers[a].dtype) for a in k.args))
        for k in schedule.kernels
    }
