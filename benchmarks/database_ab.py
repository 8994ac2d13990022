"""A mix's shipped database at another git revision against the working tree's, model by model.

    python benchmarks/database_ab.py --rev abf6c35 --mix demo > benchmarks/results/database-ab-demo.txt

Each model of the mix alone (one stream, all cores) compiled with either database, next to ONNX
Runtime at the same threads, every contender in one process on the same inputs, runs alternated.
For a change in how databases are tuned (e.g. the thread count candidates are timed on).
"""

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

os.environ.setdefault("TVM_BIND_THREADS", "0")

import cosched
from cosched import bench
from cosched.compare import MIXES, cosched_contender, load_models, make_inputs, shipped_database
from cosched.target import host_target

REPO = Path(__file__).resolve().parent.parent


def database_at(rev: str, database: Path, tmp: Path) -> Path:
    """``database`` (a folder of the repository) as it was at ``rev``, extracted under ``tmp``."""
    folder = database.resolve().relative_to(REPO)
    archive = tmp / "db.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev, str(folder)], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="git revision of the other database")
    parser.add_argument("--mix", default="demo", choices=list(MIXES))
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    current = shipped_database(args.mix)
    if current is None:
        print(f"no shipped database for {args.mix} on this CPU", file=sys.stderr)
        return 1
    models = load_models(MIXES[args.mix])
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        databases = {args.rev: database_at(args.rev, current, Path(tmp)), "current": current}
        for name, model in models.items():
            tenants = [cosched.load_onnx(model, name=name)]
            inputs = make_inputs(tenants)
            contenders = [
                cosched_contender(f"{name} db {label}", cosched.compile(tenants, database=db, cores=threads), inputs)
                for label, db in databases.items()
            ]
            contenders.append(bench.ort_sequential({name: model}, inputs, threads))
            with bench.closing(contenders):
                results = bench.measure(contenders, repeat=args.repeat, warmup=2)
            tables.append(bench.format_table(results, contenders[0].name))
    print(bench.header(threads, host_target()))
    print(f"mix: {args.mix}; databases: {args.rev} vs working tree ({current})")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
