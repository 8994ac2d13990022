"""Each model of a mix alone: tuned TVM against ONNX Runtime, with more rounds than compare.py gives them.

    python benchmarks/per_model.py --mix resnet_squeeze --repeat 40 > benchmarks/results/per-model-resnet_squeeze.txt

The per-model goal (tuned TVM <= 1.0x ONNX Runtime's time at the same threads) needs intervals
narrow enough to tell 0.95 from 1.05 on a noisy machine: the interval narrows with the square root
of the rounds. The mix's shipped database, the Relax VM (cosched's kernels), ORT's default session.
"""

import os
import sys

os.environ.setdefault("TVM_BIND_THREADS", "0")

from cosched import bench
from cosched.compare import MIXES, format_models, load_models, model_parser, shipped_database, time_models
from cosched.target import host_target


def main() -> int:
    args = model_parser(__doc__.splitlines()[0]).parse_args()
    database = shipped_database(args.mix)
    threads = args.threads or os.cpu_count() or 1
    print(bench.header(threads, host_target()))
    print(f"database: {database or 'none (untuned kernels)'}")
    timings = time_models(load_models(args.models or MIXES[args.mix]), threads, database, repeat=args.repeat)
    print(format_models(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
