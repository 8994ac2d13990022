"""Bundle behaviour: bad input errors, thread safety, export/reload in a fresh process, traces."""

import itertools
import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import cosched
from cosched import CoschedError
from cosched.runtime import load
from tests.conftest import make_inputs


@pytest.fixture(scope="module")
def tiny_inputs(tiny_tenants):
    return make_inputs(tiny_tenants, seed=7)


@pytest.fixture(scope="module")
def tiny_expected(tiny_bundle, tiny_inputs):
    return tiny_bundle.run(tiny_inputs)


def test_bad_inputs_name_the_tenant_and_the_fix(tiny_bundle, tiny_inputs):
    good = tiny_inputs
    cases = [
        ({k: v for k, v in good.items() if k != "beta"}, "tenant 'beta': no inputs given"),
        ({**good, "delta": {"input": good["alpha"]["input"]}}, "tenant 'delta': no such tenant"),
        ({**good, "alpha": {}}, "tenant 'alpha': missing input 'input'"),
        (
            {**good, "alpha": {**good["alpha"], "extra": good["alpha"]["input"]}},
            "tenant 'alpha': unknown input 'extra'",
        ),
        (
            {**good, "gamma": {"input": np.zeros((1, 3, 16, 16), "float32")}},
            r"tenant 'gamma': input 'input' has shape \(1, 3, 16, 16\), expected \(1, 3, 20, 20\)",
        ),
        (
            {**good, "alpha": {"input": good["alpha"]["input"].astype("float64")}},
            r"tenant 'alpha'.*dtype float64.*astype\('float32'\)",
        ),
    ]
    for inputs, message in cases:
        with pytest.raises(CoschedError, match=message):
            tiny_bundle.run(inputs)


def test_duplicate_tenant_names_are_refused(tiny_models):
    with pytest.raises(CoschedError, match="tenant 'alpha': two tenants have this name"):
        cosched.compile([cosched.load_onnx(tiny_models["alpha"], name="alpha")] * 2)


def test_corrupt_and_non_onnx_files(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    text = tmp_path / "notes.onnx"
    text.write_text("this is a text file, not a model")
    for path in (corrupt, text):
        with pytest.raises(CoschedError, match=rf"tenant '{path.stem}'.*(not a valid ONNX|invalid|no nodes)"):
            cosched.load_onnx(path)
    with pytest.raises(CoschedError, match="tenant 'missing': no such file"):
        cosched.load_onnx(tmp_path / "missing.onnx")


def test_unsupported_operator_is_a_cosched_error(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    with pytest.raises(CoschedError, match="tenant 'weird'"):
        cosched.load_onnx(model, name="weird")


def test_symbolic_shapes_need_shapes_argument(tiny_models):
    model = type(tiny_models["alpha"]).FromString(tiny_models["alpha"].SerializeToString())
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(CoschedError, match=r"symbolic shape.*shapes="):
        cosched.load_onnx(model, name="alpha")
    tenant = cosched.load_onnx(model, name="alpha", shapes={"input": (2, 3, 16, 16)})
    assert tenant.inputs[0].shape == (2, 3, 16, 16)


def test_relax_tenant_needs_static_shapes():
    from tvm import relax, tirx

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tirx.Var("n", "int64"), 4], "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.nn.relu(x)))
    with pytest.raises(CoschedError, match=r"tenant 'sym'.*parameter x is not a tensor of static shape"):
        cosched.from_relax(bb.get(), name="sym")


def test_eight_threads_share_one_bundle(tiny_bundle, tiny_tenants, tiny_expected):
    inputs = [make_inputs(tiny_tenants, seed=s) for s in range(8)]
    expected = [tiny_bundle.run(i) for i in inputs]
    errors = []

    def worker(i):
        try:
            for _ in range(200):
                out = tiny_bundle.run(inputs[i])
                for tenant, outs in out.items():
                    for got, want in zip(outs, expected[i][tenant], strict=True):
                        if not np.array_equal(got, want):
                            errors.append((i, tenant))
                            return
        except Exception as err:  # surfaced below
            errors.append((i, repr(err)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_with_schedule_shares_the_weights(tiny_bundle, tiny_inputs, tiny_expected):
    """Another schedule of the same kernels (what a search builds dozens of) reuses the uploaded
    weights instead of copying them, and computes the same; new params still get their own copy."""
    from cosched.search import sequential_schedule

    other = tiny_bundle.with_schedule(sequential_schedule(tiny_bundle.schedule))
    assert other.schedule.num_streams == 1 != tiny_bundle.schedule.num_streams
    assert other._params is tiny_bundle._params
    for tenant, outs in other.run(tiny_inputs).items():
        for got, want in zip(outs, tiny_expected[tenant], strict=True):
            np.testing.assert_array_equal(got, want)
    zeros = {bid: np.zeros_like(value) for bid, value in tiny_bundle.params().items()}
    replaced = tiny_bundle.with_schedule(tiny_bundle.schedule, zeros)
    assert replaced._params is not tiny_bundle._params
    assert not np.array_equal(next(iter(replaced.run(tiny_inputs).values()))[0], next(iter(tiny_expected.values()))[0])
    np.testing.assert_array_equal(
        tiny_bundle.run(tiny_inputs)[tiny_bundle.tenants[0]][0], tiny_expected[tiny_bundle.tenants[0]][0]
    )


def test_export_reloads_in_a_fresh_process_without_the_compiler(tiny_bundle, tiny_inputs, tiny_expected, tmp_path):
    out_dir = tiny_bundle.export(tmp_path / "bundle")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["cosched_executor.so", "ir.txt", "kernels.so", "manifest.json", "params.npz", "schedule.json"]
    )
    np.savez(tmp_path / "inputs.npz", **{f"{t}/{n}": a for t, ins in tiny_inputs.items() for n, a in ins.items()})
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "tvm" or name.startswith("tvm."):
                    raise ImportError("the TVM compiler must not be imported at deployment: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        import cosched.runtime
        bundle = cosched.runtime.load({str(out_dir)!r})
        data = np.load({str(tmp_path / "inputs.npz")!r})
        inputs = {{}}
        for key in data.files:
            t, n = key.split("/", 1)
            inputs.setdefault(t, {{}})[n] = data[key]
        out = bundle.run(inputs)
        np.savez({str(tmp_path / "out.npz")!r}, **{{f"{{t}}/{{i}}": o for t, outs in out.items() for i, o in enumerate(outs)}})
        assert "tvm" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    got = np.load(tmp_path / "out.npz")
    for tenant, outs in tiny_expected.items():
        for i, want in enumerate(outs):
            np.testing.assert_array_equal(got[f"{tenant}/{i}"], want)


def test_export_is_atomic(tiny_bundle, tmp_path, monkeypatch):
    target = tiny_bundle.export(tmp_path / "bundle")
    before = json.loads((target / "manifest.json").read_text())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny_bundle.export(tmp_path / "bundle")
    with pytest.raises(OSError, match="disk full"):
        tiny_bundle.export(tmp_path / "fresh")
    # The old bundle is intact, the new one was never half-written, no temp folders are left.
    assert json.loads((target / "manifest.json").read_text()) == before
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_load_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    with pytest.raises(CoschedError, match="not a cosched bundle"):
        load(tmp_path)


def test_profile_trace_respects_the_schedule(tiny_bundle, tiny_inputs, tmp_path):
    trace = tiny_bundle.profile(tiny_inputs)
    schedule = tiny_bundle.schedule
    assert len(trace.events) == len(schedule.kernels)
    by_kernel = {e.kernel: e for e in trace.events}
    for s in range(schedule.num_streams):
        events = [by_kernel[k.id] for k in schedule.stream_kernels(s)]
        for a, b in itertools.pairwise(events):
            assert a.end_us <= b.start_us  # a stream runs its kernels one after another, in order
    for k in schedule.kernels:
        for w in k.waits:
            assert by_kernel[w].end_us <= by_kernel[k.id].start_us
    chrome = json.loads(trace.save_chrome(tmp_path / "trace.json").read_text())
    assert sum(1 for e in chrome["traceEvents"] if e["ph"] == "X") == len(schedule.kernels)
    png = trace.plot(tmp_path / "gantt.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_concurrent_streams_overlap():
    """With two streams and two cores the workers really run at the same time (kernels of a few ms)."""
    from cosched.models import tiny_cnn

    tenants = [cosched.load_onnx(tiny_cnn(n, seed=i, width=32, size=32), name=n) for i, n in enumerate("ab")]
    bundle = cosched.compile(tenants, num_streams=2)
    inputs = make_inputs(tenants)
    overlaps = 0
    for _ in range(3):
        trace = bundle.profile(inputs)
        a = [(e.start_us, e.end_us) for e in trace.events if e.stream == 0]
        b = [(e.start_us, e.end_us) for e in trace.events if e.stream == 1]
        overlaps += sum(1 for s0, e0 in a for s1, e1 in b if s0 < e1 and s1 < e0)
    assert overlaps > 0


def test_trace_span_starts_at_the_first_kernel():
    from cosched.runtime.trace import Trace, TraceEvent

    events = [TraceEvent(0, "f", "a", 0, 5.0, 10.0), TraceEvent(1, "g", "b", 1, 12.0, 20.0)]
    trace = Trace(events=events, num_streams=2, tenants=["a", "b"])
    assert trace.makespan_us == 20.0 and trace.span_us == 15.0
    assert Trace(events=[], num_streams=1, tenants=[]).span_us == 0.0


def test_either_parallel_runner_computes_the_same(tiny_bundle, tiny_inputs, tiny_expected):
    other = tiny_bundle.with_schedule(tiny_bundle.schedule)
    assert other.parallel == "cosched"
    assert not other.loops_on_helpers  # untuned kernels have no parallel loops to route
    other.parallel = "tvm"
    for tenant, outs in other.run(tiny_inputs).items():
        for got, want in zip(outs, tiny_expected[tenant], strict=True):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(CoschedError, match="unknown parallel runner"):
        other.parallel = "openmp"
