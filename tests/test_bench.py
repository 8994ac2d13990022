"""Fast tests of the benchmark core: baselines agree, timing alternates, tables are complete."""

import itertools
import os
import threading
import time

# Must be in the environment before TVM creates any thread pool (i.e. before importing tvm is the
# safe place): otherwise TVM pins the first thread to core 0 and threads inherit it.
os.environ["TVM_BIND_THREADS"] = "0"

import json

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from cosched import bench
from cosched.errors import CoschedError
from cosched.models import light_model
from cosched.tenant import load_onnx

pytest.importorskip("onnxruntime")

THREADS = 2
# Generic x86: untuned code is faster there than with the host CPU's AVX-512 (shared README).
TARGET = tvm.target.Target({"kind": "llvm"})


def tiny_model() -> onnx.ModelProto:
    """y = relu(x @ W + b), x: 1x8."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype("float32"), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype("float32"), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[w, b],
    )
    # An IR version ONNX Runtime accepts (onnx may default to a newer one).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def setup():
    protos = {"squeezenet": light_model("squeezenet", 0), "tiny": tiny_model()}
    tenants = [load_onnx(p, name=n) for n, p in protos.items()]
    rng = np.random.default_rng(0)
    inputs = {t.name: {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in t.inputs} for t in tenants}
    exes = {t.name: bench.compile_tenant(t, TARGET) for t in tenants}
    contenders = [
        # Memory is measured for one VM contender only: it exports the libraries (a few seconds).
        bench.relax_vm_sequential(tenants, inputs, TARGET, THREADS, executables=exes),
        bench.relax_vm_concurrent(tenants, inputs, TARGET, THREADS, executables=exes, measure_memory=False),
        bench.ort_sequential(protos, inputs, THREADS),
        bench.ort_concurrent(protos, inputs, THREADS),
    ]
    yield tenants, inputs, contenders
    for c in contenders:
        c.close()


def test_contenders_agree(setup):
    _, inputs, contenders = setup
    outputs = [c.run_once() for c in contenders]
    reference = outputs[0]
    assert set(reference) == {"squeezenet", "tiny"}
    for c, out in zip(contenders[1:], outputs[1:], strict=True):
        assert set(out) == set(reference), c.name
        for name in reference:
            assert len(out[name]) == len(reference[name]) == 1
            np.testing.assert_allclose(
                out[name][0],
                reference[name][0],
                rtol=1e-4,
                atol=1e-5,
                err_msg=f"{c.name} vs {contenders[0].name} on {name}",
            )
    # The tiny model by hand, so that agreement is not agreement on a wrong answer.
    w = numpy_helper.to_array(tiny_model().graph.initializer[0])
    b = numpy_helper.to_array(tiny_model().graph.initializer[1])
    np.testing.assert_allclose(reference["tiny"][0], np.maximum(inputs["tiny"]["x"] @ w + b, 0), rtol=1e-5, atol=1e-6)


def test_memory_and_measure_table(setup):
    _, _, contenders = setup
    assert contenders[0].memory_bytes and contenders[0].memory_bytes > 1 << 20  # weights alone are ~5 MB
    assert contenders[1].memory_bytes is None
    assert contenders[2].memory_bytes and contenders[3].memory_bytes
    results = bench.measure(contenders, repeat=3, warmup=1, settle_s=0.05)
    assert [r.name for r in results] == [c.name for c in contenders]
    for r in results:
        assert r.repeat == 3 and r.min_ms <= r.p25 <= r.median_ms <= r.p75
    table = bench.format_table(results, "relax-vm-seq")
    base_row = next(line for line in table.splitlines() if line.startswith("relax-vm-seq "))
    assert " 1.00 " in base_row
    for c in contenders:
        assert any(line.startswith(c.name + " ") for line in table.splitlines()), c.name
    assert "RSS" in table  # the memory column says how it was obtained
    doc = json.loads(bench.to_json(results, "relax-vm-seq"))
    assert doc["results"][0]["speedup"] == pytest.approx(1.0)


class _Recorder:
    def __init__(self):
        self.calls: list[str] = []

    def contender(self, name: str) -> bench.Contender:
        return bench.Contender(name, lambda: self.calls.append(name), memory_bytes=None, close=None)


def test_measure_alternates_in_shuffled_rounds():
    rec = _Recorder()
    names = ["a", "b", "c", "d"]
    results = bench.measure([rec.contender(n) for n in names], repeat=10, warmup=2, settle_s=0)
    assert len(rec.calls) == 4 * 12
    rounds = [rec.calls[i : i + 4] for i in range(0, len(rec.calls), 4)]
    assert all(sorted(r) == names for r in rounds)  # every contender once per round
    pairs = list(itertools.pairwise(rec.calls))
    assert all(a != b for a, b in pairs)  # never two runs of one in a row
    # Neighbours change: each contender follows at least two different others over the rounds.
    before = {n: {a for a, b in pairs if b == n} for n in names}
    assert all(len(prev) >= 2 for prev in before.values()), before
    assert [r.repeat for r in results] == [10] * 4

    rec = _Recorder()
    bench.measure([rec.contender(n) for n in names], repeat=2, warmup=0, shuffle=False, settle_s=0)
    assert rec.calls == names * 2


def test_measure_statistics():
    c = bench.Contender("x", lambda: None, 123, None)
    (r,) = bench.measure([c], repeat=5, warmup=0, settle_s=0)
    assert r.memory_bytes == 123 and r.repeat == 5 and len(r.samples_ms) == 5
    assert r.iqr_ms >= 0
    with pytest.raises(CoschedError):
        bench.measure([c, bench.Contender("x", lambda: None)], repeat=1)
    with pytest.raises(CoschedError):
        bench.format_table([r], "nope")


def test_table_memory_column_and_direction():
    results = [
        bench.Result("base", 10.0, 9.0, 11.0, None, 8.0, 3),
        bench.Result("fast", 5.0, 4.5, 5.5, 3 * 2**20, 4.0, 3, "planned"),
    ]
    table = bench.format_table(results, "base")
    assert "base/this" in table and ">1 faster" in table
    rows = {line.split()[0]: line for line in table.splitlines()[2:4]}
    assert " 1.00 " in rows["base"] and " 2.00 " in rows["fast"]
    assert rows["base"].rstrip().endswith("-") and "3.0*" in rows["fast"]
    assert "planned" in table


@pytest.mark.parametrize("spinning", [None, False, True])
def test_ort_session_spinning_is_set(spinning):
    tenant = bench._OrtTenant("tiny", tiny_model().SerializeToString(), {"x": np.zeros((1, 8), "float32")}, 1, spinning)
    options = tenant.session.get_session_options()
    if spinning is None:  # ONNX Runtime's default (on): no entry
        with pytest.raises(Exception, match="does not have configuration"):
            options.get_session_config_entry("session.intra_op.allow_spinning")
    else:
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spinning))


def test_split_threads():
    assert bench.split_threads(2, 2) == [1, 1]
    assert bench.split_threads(5, 2) == [3, 2]
    assert bench.split_threads(1, 3) == [1, 1, 1]
    with pytest.raises(CoschedError):
        bench.split_threads(0, 2)


def test_worker_tvm_pool_size():
    # The pool size is fixed when a thread first creates its pool; each worker gets its own.
    for n in (1, 2):
        w = bench._Worker(f"t{n}", tvm_threads=n)
        try:
            assert w.tvm_threads == n
            assert w.call(tvm.runtime.num_threads) == n
        finally:
            w.close()


def test_missing_inputs_rejected(setup):
    tenants, inputs, _ = setup
    with pytest.raises(CoschedError, match="no inputs"):
        bench.relax_vm_sequential(tenants, {"tiny": inputs["tiny"]}, TARGET, 1, measure_memory=False)
    bad = {**inputs, "tiny": {"x": np.zeros((2, 8), "float32")}}
    with pytest.raises(CoschedError, match="expected"):
        bench.relax_vm_sequential(tenants, bad, TARGET, 1, measure_memory=False)


def test_missing_database_rejected(setup, tmp_path):
    tenants, _, _ = setup
    with pytest.raises(CoschedError, match="no tuning database"):
        bench.compile_tenant(tenants[1], TARGET, database=tmp_path / "nothing")


def test_header():
    text = bench.header(threads=THREADS, target=TARGET)
    for word in ("tvm ", "tvm_ffi", "onnxruntime", "numpy", "python", "os.cpu_count()", "threads : 2", "date"):
        assert word in text


def test_speedup_interval_pairs_the_rounds():
    rng = np.random.default_rng(1)
    # Each round's load slows both contenders alike (x1 to x2); the fast one is truly 1.25x faster.
    load = rng.uniform(1.0, 2.0, 15)
    base = bench.Result.from_samples("base", list(10.0 * load * rng.normal(1, 0.02, 15)))
    fast = bench.Result.from_samples("fast", list(8.0 * load * rng.normal(1, 0.02, 15)))
    gain = bench.speedup(base, fast)
    assert gain.value == pytest.approx(base.median_ms / fast.median_ms)
    assert gain.low < 1.25 < gain.high and gain.low > 1.0  # the shared load cancels: faster, with confidence
    # The same samples with the rounds shuffled apart: the load no longer cancels, the interval widens.
    unpaired = bench.Result.from_samples("fast", [*rng.permutation(fast.samples_ms), fast.median_ms])
    wide = bench.speedup(base, unpaired)
    assert wide.high - wide.low > 2 * (gain.high - gain.low)
    assert bench.speedup(base, fast) == gain  # seeded
    assert bench.speedup(base, base) == bench.Speedup(1.0, 1.0, 1.0)
    assert f"{gain:x}".startswith(f"{gain.value:.2f}x [") and str(gain).endswith("]")


def test_speedup_without_samples_has_no_interval():
    base, fast = bench.Result("base", 10.0, 9.0, 11.0), bench.Result("fast", 5.0, 4.5, 5.5)
    gain = bench.speedup(base, fast)
    assert gain.value == 2.0 and np.isnan(gain.low) and str(gain) == "2.00" and f"{gain:x}" == "2.00x"
    few = bench.speedup(bench.Result.from_samples("a", [1.0, 2.0]), bench.Result.from_samples("b", [1.0, 2.0]))
    assert np.isnan(few.low)
    table = bench.format_table([base, fast], "base")
    assert "bootstrap" not in table  # no interval, no legend for one


def test_table_and_json_show_the_interval():
    rng = np.random.default_rng(2)
    base = bench.Result.from_samples("base", list(rng.normal(10, 0.5, 9)))
    fast = bench.Result.from_samples("fast", list(rng.normal(5, 0.25, 9)))
    table = bench.format_table([base, fast], "base")
    gain = bench.speedup(base, fast)
    assert str(gain) in table and "bootstrap interval" in table
    doc = json.loads(bench.to_json([base, fast], "base"))
    assert doc["results"][1]["speedup_interval"] == pytest.approx([gain.low, gain.high])


def test_time_models_pairs_tvm_cosched_and_ort_per_model(tiny_models):
    from cosched.compare import format_models, time_models

    timings = time_models(tiny_models, threads=1, repeat=3, warmup=1)
    assert [m.name for m in timings] == list(tiny_models)
    for m in timings:
        assert (m.tvm.name, m.ort.name, m.cosched.name) == (f"tvm:{m.name}", f"ort:{m.name}", f"cosched:{m.name}")
        assert len(m.tvm.samples_ms) == len(m.ort.samples_ms) == len(m.cosched.samples_ms) == 3  # paired rounds
        assert m.ratio.value == pytest.approx(m.tvm.median_ms / m.ort.median_ms)
        assert m.cosched_ratio.value == pytest.approx(m.cosched.median_ms / m.ort.median_ms)
        assert m.ratio.low <= m.ratio.high and m.cosched_ratio.low <= m.cosched_ratio.high
    table = format_models(timings)
    assert all(line.startswith(m.name + " ") for m, line in zip(timings, table.splitlines()[2:], strict=False))
    assert "bootstrap interval" in table


def test_settle_waits_for_busy_threads_to_go_idle():
    stop = time.perf_counter() + 0.3

    def spin():  # what an idle thread pool's worker does: burn a core, then sleep
        while time.perf_counter() < stop:
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    waited = bench.settle(0.0, max_s=5.0)
    worker.join()
    assert 0.25 <= waited < 5.0
    # An idle process: the minimum, not the cap.
    assert bench.settle(0.05, max_s=5.0) < 2.5
    # The cap holds while something keeps the process busy.
    stop = time.perf_counter() + 3.0
    worker = threading.Thread(target=spin)
    worker.start()
    waited = bench.settle(0.0, max_s=0.5)
    worker.join()
    assert 0.5 <= waited < 2.5


def test_a_mix_without_a_shipped_database_says_how_to_tune_it(tmp_path, monkeypatch):
    from cosched.compare import load_mix

    monkeypatch.setenv("COSCHED_DATABASES", str(tmp_path))
    with pytest.raises(CoschedError, match=r"no shipped database for mix demo.*cosched tune squeezenet"):
        load_mix("demo")
    # Another CPU's database of the mix is where the command starts from.
    (tmp_path / "another_cpu" / "demo").mkdir(parents=True)
    with pytest.raises(CoschedError, match=r"--start-from \S*another_cpu/demo"):
        load_mix("demo")


def test_tuning_starts_from_the_database_of_the_closest_cpu(tmp_path, monkeypatch):
    """Records replay best on a CPU with the same instructions: the closest CPU's database, not the last name."""
    from cosched import compare

    monkeypatch.setenv("COSCHED_DATABASES", str(tmp_path))
    monkeypatch.setattr(compare, "host_cpu", lambda: "znver4")
    for cpu in ("znver1", "sapphirerapids", "x86-64", "not_a_cpu"):
        (tmp_path / cpu / "demo").mkdir(parents=True)
    # AVX-512 like Zen 4: Sapphire Rapids; Zen 1 is AMD too but has no AVX-512, x86-64 none of either.
    assert compare.nearest_database("demo") == tmp_path / "sapphirerapids" / "demo"
    (tmp_path / "znver5" / "demo").mkdir(parents=True)
    assert compare.nearest_database("demo") == tmp_path / "znver5" / "demo"
    assert "--start-from" in compare.tune_command("demo") and "znver5/demo" in compare.tune_command("demo")
    assert compare.nearest_database("resnet_squeeze") is None


def test_sequential_baselines_run_the_same_models_one_after_another():
    from cosched.compare import make_inputs, sequential_baselines
    from cosched.models import tiny_cnn

    tenants = [load_onnx(tiny_cnn(n, seed=i), name=n) for i, n in enumerate(["a", "b"])]
    inputs = make_inputs(tenants)
    bundle, contenders, exes = sequential_baselines(tenants, inputs, None, threads=2)
    assert [c.name for c in contenders] == ["relax-vm-seq", "cosched-sequential-1"]
    assert sorted(exes) == ["a", "b"]
    assert bundle.schedule.num_streams >= 1
    with bench.closing(contenders):
        vm, one_stream = (c.run_once() for c in contenders)
    for name in ("a", "b"):
        np.testing.assert_allclose(one_stream[name][0], vm[name][0].reshape(one_stream[name][0].shape), rtol=1e-5)
