"""Per-kernel timelines of a bundle run: Chrome/Perfetto JSON and a Gantt picture."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TraceEvent:
    """One kernel execution; times in microseconds from the start of the run."""

    kernel: int
    func: str
    tenant: str
    stream: int
    start_us: float
    end_us: float


@dataclass
class Trace:
    """The kernels of one run with their stream and start/end times."""

    events: list[TraceEvent]
    num_streams: int
    tenants: list[str]
    device: str = "cpu"

    @property
    def makespan_us(self) -> float:
        return max((e.end_us for e in self.events), default=0.0)

    @property
    def span_us(self) -> float:
        """From the first kernel's start to the last one's end: the makespan less the wait before the first."""
        return max((e.end_us for e in self.events), default=0.0) - min((e.start_us for e in self.events), default=0.0)

    def busy_us(self, stream: int) -> float:
        return sum(e.end_us - e.start_us for e in self.events if e.stream == stream)

    def to_chrome(self) -> dict:
        """Chrome trace-event format (chrome://tracing, ui.perfetto.dev): one thread per stream."""
        events = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stream {s}"}}
            for s in range(self.num_streams)
        ]
        events += [
            {
                "name": e.func,
                "cat": e.tenant,
                "ph": "X",
                "pid": 0,
                "tid": e.stream,
                "ts": e.start_us,
                "dur": max(e.end_us - e.start_us, 0.001),
                "args": {"tenant": e.tenant, "kernel": e.kernel},
            }
            for e in self.events
        ]
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"device": self.device}}

    def save_chrome(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_chrome()))
        return path

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """A Gantt chart: one row per stream, one colour per tenant."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        colors = plt.get_cmap("tab10")
        color_of = {t: colors(i % 10) for i, t in enumerate(self.tenants)}
        fig, ax = plt.subplots(figsize=(12, 1.2 + 0.6 * self.num_streams))
        for s in range(self.num_streams):
            spans = [(e.start_us / 1000, (e.end_us - e.start_us) / 1000) for e in self.events if e.stream == s]
            cols = [color_of[e.tenant] for e in self.events if e.stream == s]
            ax.broken_barh(spans, (s - 0.4, 0.8), facecolors=cols, edgecolor="black", linewidth=0.2)
        ax.set_yticks(range(self.num_streams), [f"stream {s}" for s in range(self.num_streams)])
        ax.invert_yaxis()
        ax.set_xlabel("time (ms)")
        busy = sum(self.busy_us(s) for s in range(self.num_streams))
        ax.set_title(
            title
            or f"{self.device}: makespan {self.makespan_us / 1000:.2f} ms, "
            f"kernel time {busy / 1000:.2f} ms over {self.num_streams} stream(s)"
        )
        ax.legend(handles=[Patch(color=c, label=t) for t, c in color_of.items()], loc="upper right", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
