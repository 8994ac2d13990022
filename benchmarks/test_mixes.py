"""pytest-benchmark view of the same contenders as `cosched bench`, one benchmark group per mix.

Run with `make bench`. pytest-benchmark times each contender in turn (not alternated); for ratios
taken in one alternating run use `python benchmarks/compare.py`, which is what the README reports.
"""

import os

import pytest

from cosched import bench
from cosched.compare import cosched_contender, load_models, make_inputs, shipped_database
from cosched.compiler import compile as compile_bundle
from cosched.target import host_target
from cosched.tenant import load_onnx

MIXES = {"demo": ("squeezenet", "shufflenet", "inception_v1")}
THREADS = os.cpu_count() or 1


@pytest.fixture(scope="module", params=list(MIXES))
def mix(request):
    models = load_models(MIXES[request.param])
    tenants = [load_onnx(m, name=n) for n, m in models.items()]
    inputs = make_inputs(tenants)
    database = shipped_database(request.param)
    target = host_target()
    contenders = {
        "relax-vm-seq": bench.relax_vm_sequential(tenants, inputs, target, THREADS, database),
        "relax-vm-concurrent": bench.relax_vm_concurrent(tenants, inputs, target, THREADS, database),
        "cosched-breadth_first": cosched_contender(
            "cosched-breadth_first", compile_bundle(tenants, target, database=database, cores=THREADS), inputs
        ),
        "ort-seq": bench.ort_sequential(models, inputs, THREADS),
        "ort-concurrent": bench.ort_concurrent(models, inputs, THREADS),
        "ort-seq-nospin": bench.ort_sequential(models, inputs, THREADS, spinning=False, name="ort-seq-nospin"),
    }
    with bench.closing(contenders.values()):
        yield request.param, contenders


@pytest.mark.parametrize(
    "contender",
    ["relax-vm-seq", "relax-vm-concurrent", "cosched-breadth_first", "ort-seq", "ort-concurrent", "ort-seq-nospin"],
)
def test_mix(benchmark, mix, contender):
    name, contenders = mix
    benchmark.group = f"mix {name}"
    benchmark.pedantic(contenders[contender].run, rounds=5, warmup_rounds=1)
