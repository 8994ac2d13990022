"""The schedule IR: a plain, JSON-serializable co-schedule of a bundle's kernels.

It is what the passes produce, what the runtime executes and what tuning and search edit. It
imports no TVM, so a deployed bundle reads it with the runtime alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CoschedError

# 2: several kernels may write one buffer (in-place updates, e.g. a concatenation's producers).
# A version-1 reader would take the later writers' waits for redundant, so it is told apart.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class Buffer:
    """A tensor the schedule reads or writes. ``kind``: input, param, intermediate or output."""

    id: int
    shape: list[int]
    dtype: str
    kind: str
    tenant: str | None = None
    name: str = ""

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        bits = int("".join(c for c in self.dtype if c.isdigit()) or 8)
        return n * max(bits // 8, 1)


@dataclass
class Kernel:
    """One kernel call: ``args`` are buffer ids in call order, the last ``num_outputs`` are written."""

    id: int
    func: str
    tenant: str
    args: list[int]
    num_outputs: int
    stream: int = 0
    order: int = 0
    waits: list[int] = field(default_factory=list)
    slice_bytes: dict[int, int] = field(default_factory=dict)
    """Arguments (by position) of which the kernel touches only a slice, e.g. of a concatenation
    written in place, with the slice's size in bytes."""

    @property
    def inputs(self) -> list[int]:
        return self.args[: len(self.args) - self.num_outputs]

    @property
    def outputs(self) -> list[int]:
        return self.args[len(self.args) - self.num_outputs :]


@dataclass
class TenantIO:
    """A tenant's data inputs (name -> buffer) and outputs (buffers, in the model's order)."""

    name: str
    inputs: dict[str, int]
    outputs: list[int]


@dataclass
class Stream:
    """A stream of the schedule; on CPU a worker whose kernels use at most ``threads`` cores of the budget.

    The runtime shares the budget work-conservingly: a kernel takes the free cores up to this cap,
    leaving one to each other ready stream. Caps that sum to the budget give a static split.
    """

    id: int
    threads: int = 1


@dataclass
class Schedule:
    """Kernels in issue order (a topological order), with stream, order within the stream and waits."""

    kernels: list[Kernel]
    buffers: list[Buffer]
    tenants: list[TenantIO]
    streams: list[Stream]
    strategy: str = "sequential"
    policy: str = "tenant"
    cores: int = 1  # the core budget the streams share
    version: int = SCHEMA_VERSION

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        if data.get("version") not in READABLE_VERSIONS:
            raise CoschedError(
                f"schedule IR version {data.get('version')} is not supported (expected {SCHEMA_VERSION})",
                hint="re-export the bundle with this version of cosched",
            )
        return cls(
            # JSON keys are strings.
            kernels=[
                Kernel(**{**k, "slice_bytes": {int(p): n for p, n in k.get("slice_bytes", {}).items()}})
                for k in data["kernels"]
            ],
            buffers=[Buffer(**b) for b in data["buffers"]],
            tenants=[TenantIO(**t) for t in data["tenants"]],
            streams=[Stream(**s) for s in data["streams"]],
            strategy=data.get("strategy", ""),
            policy=data.get("policy", ""),
            cores=data.get("cores", 1),
            version=SCHEMA_VERSION,
        )

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        return cls.from_json(Path(path).read_text())

    # -- structure -----------------------------------------------------------------------------
    @property
    def num_streams(self) -> int:
        return len(self.streams)

    def tenant_names(self) -> list[str]:
        return [t.name for t in self.tenants]

    def kernel_bytes(self, kernel: Kernel) -> int:
        """Bytes ``kernel`` reads and writes: its arguments, or the slices of them it touches."""
        return sum(kernel.slice_bytes.get(i, self.buffers[b].nbytes) for i, b in enumerate(kernel.args))

    def stream_kernels(self, stream: int) -> list[Kernel]:
        """The kernels of one stream in their order on it."""
        return sorted((k for k in self.kernels if k.stream == stream), key=lambda k: k.order)

    def dependencies(self) -> dict[int, list[int]]:
        """Kernel id -> ids of the kernels it must follow: the last earlier writer of each buffer it
        reads or writes. Several kernels write one buffer when they fill its parts in place (a
        concatenation's producers); each then follows the one before it."""
        last_writer: dict[int, int] = {}
        deps: dict[int, list[int]] = {}
        for k in self.kernels:  # issue order
            deps[k.id] = sorted({last_writer[b] for b in k.args if b in last_writer})
            for b in k.outputs:
                last_writer[b] = k.id
        return deps

    def clocks(self) -> dict[int, list[int]]:
        """Vector clock at the *start* of each kernel: per stream, the highest order known finished.

        Kernel ``a`` happens before kernel ``b`` iff ``clocks()[b][a.stream] >= a.order``: either ``a``
        is earlier on ``b``'s stream or a chain of waits orders them.
        """
        by_id = {k.id: k for k in self.kernels}
        position = {k.id: i for i, k in enumerate(self.kernels)}
        start: dict[int, list[int]] = {}
        finish: dict[int, list[int]] = {}
        # Streams are processed in their own order; a wait's target must be finished earlier in issue
        # order, which validate() checks, so one pass in issue order suffices.
        last: dict[int, list[int]] = {s.id: [-1] * self.num_streams for s in self.streams}
        for k in self.kernels:
            clock = list(last[k.stream])
            for w in k.waits:
                if w not in finish or position[w] > position[k.id]:
                    raise CoschedError(
                        f"kernel {k.id} ({k.func}) waits on kernel {w}, which is not issued before it",
                        tenant=k.tenant,
                        hint="waits must point to kernels earlier in the schedule",
                    )
                clock = [max(a, b) for a, b in zip(clock, finish[w], strict=True)]
            start[k.id] = clock
            done = list(clock)
            done[k.stream] = max(done[k.stream], by_id[k.id].order)
            finish[k.id] = done
            last[k.stream] = done
        return start

    def redundant_waits(self) -> list[tuple[int, int]]:
        """(kernel, wait) pairs whose wait could be dropped without losing any data dependency."""
        by_id = {k.id: k for k in self.kernels}
        deps = self.dependencies()
        start = self.clocks()
        finish = {kid: _finish(c, by_id[kid]) for kid, c in start.items()}
        before: dict[int, list[int]] = {}
        last: dict[int, list[int]] = {s.id: [-1] * self.num_streams for s in self.streams}
        for k in self.kernels:
            before[k.id] = last[k.stream]
            last[k.stream] = finish[k.id]
        redundant = []
        for k in self.kernels:
            for w in k.waits:
                clock = list(before[k.id])
                for other in k.waits:
                    if other != w:
                        clock = [max(a, b) for a, b in zip(clock, finish[other], strict=True)]
                if all(clock[by_id[d].stream] >= by_id[d].order for d in deps[k.id]):
                    redundant.append((k.id, w))
        return redundant

    def validate(self) -> None:
        """Raise CoschedError unless every dependency is ordered, orders are consistent and waits are minimal."""
        ids = [k.id for k in self.kernels]
        if sorted(ids) != list(range(len(ids))):
            raise CoschedError("kernel ids must be 0..N-1", hint="rebuild the schedule with cosched")
        stream_ids = {s.id for s in self.streams}
        buffer_ids = {b.id for b in self.buffers}
        for k in self.kernels:
            if k.stream not in stream_ids:
                raise CoschedError(f"kernel {k.id} is on unknown stream {k.stream}", tenant=k.tenant)
            missing = [b for b in k.args if b not in buffer_ids]
            if missing:
                raise CoschedError(f"kernel {k.id} uses unknown buffers {missing}", tenant=k.tenant)
        for s in self.streams:
            orders = [k.order for k in self.kernels if k.stream == s.id]  # in issue order
            if orders != sorted(orders) or len(set(orders)) != len(orders):
                raise CoschedError(
                    f"stream {s.id}: order within the stream disagrees with issue order",
                    hint="number each stream's kernels in issue order",
                )
        by_id = {k.id: k for k in self.kernels}
        start = self.clocks()
        for kid, deps in self.dependencies().items():
            for d in deps:
                if start[kid][by_id[d].stream] < by_id[d].order:
                    k = by_id[kid]
                    raise CoschedError(
                        f"kernel {kid} ({k.func}, stream {k.stream}) may run before kernel {d} "
                        f"(stream {by_id[d].stream}) whose output it reads",
                        tenant=k.tenant,
                        hint="add a wait or put both on one stream",
                    )
        redundant = self.redundant_waits()
        if redundant:
            raise CoschedError(f"redundant waits (kernel, wait): {redundant[:5]}", hint="drop implied waits")

    def summary(self) -> str:
        """One line per stream: threads and kernels per tenant, and the number of waits."""
        lines = [f"schedule: strategy={self.strategy} policy={self.policy} streams={self.num_streams}"]
        for s in self.streams:
            ks = self.stream_kernels(s.id)
            per = {}
            for k in ks:
                per[k.tenant] = per.get(k.tenant, 0) + 1
            waits = sum(len(k.waits) for k in ks)
            lines.append(f"  stream {s.id}: {s.threads} thread(s), kernels {per}, waits {waits}")
        return "\n".join(lines)


def _finish(start: list[int], kernel: Kernel) -> list[int]:
    done = list(start)
    done[kernel.stream] = max(done[kernel.stream], kernel.order)
    return done


def assign_waits(kernels: list[Kernel], deps: dict[int, list[int]], num_streams: int) -> None:
    """Fill each kernel's ``waits`` with the minimal set of cross-stream waits its dependencies need.

    ``kernels`` are in issue order with stream and order set. A dependency needs no wait when it is
    earlier on the same stream, or already known finished through earlier waits (vector clocks);
    of the rest, one implied by another (it happens before it) is dropped.
    """
    by_id = {k.id: k for k in kernels}
    finish: dict[int, list[int]] = {}
    last = [[-1] * num_streams for _ in range(num_streams)]
    for k in kernels:
        clock = last[k.stream]
        needed = [d for d in deps[k.id] if clock[by_id[d].stream] < by_id[d].order]
        waits = [d for d in needed if not any(o != d and finish[o][by_id[d].stream] >= by_id[d].order for o in needed)]
        k.waits = sorted(waits)
        for w in waits:
            clock = [max(a, b) for a, b in zip(clock, finish[w], strict=True)]
        finish[k.id] = _finish(clock, k)
        last[k.stream] = finish[k.id]
