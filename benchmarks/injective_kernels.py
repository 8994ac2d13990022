"""Each injective kernel of a database: its best tuned record against cosched's injective schedules.

    python benchmarks/injective_kernels.py --rev 09e05b2 --mix dense_incv2_alex \
        > benchmarks/results/injective-dense_incv2_alex.txt

For every workload that ``injective_candidates`` schedules, the best record of the mix's database
(at ``--rev``, or the working tree's) and each candidate are built and timed alone with TVM's time
evaluator on all cores, on the same random arguments; each candidate's output is checked against
the record's. Kernel times, not bundle times: they say what the kernel costs, not what a model gains.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TVM_BIND_THREADS", "0")
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np
import tvm
from database_ab import database_at
from tvm.s_tir import meta_schedule as ms

from cosched import bench
from cosched.compare import MIXES, shipped_database
from cosched.injective_schedule import injective_candidates
from cosched.target import host_target


def timed(mod: tvm.IRModule, args: list[np.ndarray], target) -> tuple[float, np.ndarray]:
    """Median microseconds of ``mod`` on ``args`` (7 repeats of 50 runs) and its output."""
    lib = tvm.compile(mod, target=target)
    tensors = [tvm.runtime.tensor(a) for a in args]
    us = float(np.median(lib.mod.time_evaluator("main", tvm.cpu(), number=50, repeat=7)(*tensors).results)) * 1e6
    lib.mod["main"](*tensors)
    return us, tensors[-1].numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", default="dense_incv2_alex", choices=list(MIXES))
    parser.add_argument("--rev", help="git revision of the database (default: the working tree's)")
    args = parser.parse_args()
    current = shipped_database(args.mix)
    if current is None:
        print(f"no shipped database for {args.mix} on this CPU", file=sys.stderr)
        return 1
    target = host_target()
    print(bench.header(threads=int(os.environ["TVM_NUM_THREADS"]), target=target))
    print(f"database: {args.mix} at {args.rev or 'the working tree'}; kernel times in us, medians")
    print(f"{'kernel':16s} {'output shape':22s} {'record':>9s} {'cosched':>9s} {'record/cosched':>15s}")
    total_record = total_best = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = database_at(args.rev, current, Path(tmp)) if args.rev else current
        db = ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=False)
        rng = np.random.default_rng(0)
        for record in db.get_all_tuning_records():
            candidates = injective_candidates(record.workload.mod)
            if not candidates:
                continue
            tuned = tvm.s_tir.Schedule(record.workload.mod)
            record.trace.apply_to_schedule(tuned, remove_postproc=False)
            infos = ms.arg_info.ArgInfo.from_prim_func(record.workload.mod["main"])
            arrays = [rng.random([int(x) for x in a.shape]).astype(a.dtype) for a in infos]
            record_us, expected = timed(tuned.mod, arrays, target)
            best = float("inf")
            for sch in candidates:
                us, out = timed(sch.mod, arrays, target)
                np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
                best = min(best, us)
            block = tuned.get(tuned.get_child_blocks(tuned.get_sblock("root"))[-1]).name_hint
            shape = str([int(x) for x in infos[-1].shape])
            print(f"{block:16s} {shape:22s} {record_us:9.1f} {best:9.1f} {record_us / best:15.2f}", flush=True)
            total_record += record_us
            total_best += best
    print(f"sum over workloads (each once): record {total_record / 1e3:.2f} ms, cosched {total_best / 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
