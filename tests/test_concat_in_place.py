"""ConcatInPlace: a concatenation's producers write into its output; results and schedules stay right."""

import itertools

import numpy as np
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

import cosched
import cosched.runtime
from cosched import tuning
from cosched.compare import make_inputs
from cosched.models import graph_model, light_model
from cosched.passes import LowerKernels
from cosched.passes.graph import CALL_TIR_INPLACE, main_block
from cosched.runtime.memory import plan_memory
from cosched.target import host_target

TARGET = host_target()


def fire_model(name: str, seed: int, concat_squeeze: bool = False, twin: bool = False):
    """SqueezeNet's fire module: squeeze 1x1, then 1x1 and 3x3 expansions concatenated on channels.

    ``concat_squeeze`` also concatenates the squeeze output, which the expansions read as well;
    ``twin`` makes both expansions 1x1 of one shape, so one kernel feeds two parts (as in Inception).
    """
    rng = np.random.default_rng(seed)
    inits = []

    def conv(x: str, out: str, cin: int, cout: int, k: int) -> list:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (cout, cin, k, k)).astype("float32"), f"{out}_w"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, cout).astype("float32"), f"{out}_b"))
        pads = [k // 2] * 4
        return [
            helper.make_node("Conv", [x, f"{out}_w", f"{out}_b"], [f"{out}_c"], pads=pads),
            helper.make_node("Relu", [f"{out}_c"], [out]),
        ]

    e3 = 6 if twin else 5
    nodes = conv("x", "s", 3, 4, 1) + conv("s", "e1", 4, 6, 1) + conv("s", "e3", 4, e3, 1 if twin else 3)
    parts = ["e1", "e3", "s"] if concat_squeeze else ["e1", "e3"]
    channels = 6 + e3 + (4 if concat_squeeze else 0)
    nodes.append(helper.make_node("Concat", parts, ["cat"], axis=1))
    nodes += conv("cat", "y", channels, 4, 1)
    nodes.append(helper.make_node("GlobalAveragePool", ["y"], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["out"]))
    return graph_model(name, nodes, inits, ("x", [1, 3, 12, 12]), ("out", [1, 4]))


def dense_block_model(name: str, seed: int, layers: int = 3):
    """A DenseNet block: each layer reads the concatenation of all earlier features (scaled, ReLU) and
    adds its own; the chain of concatenations ends in a transition convolution. The last layer's
    output is read by a side convolution too, so one slice is read at an offset."""
    rng = np.random.default_rng(seed)
    inits = []

    def init(array_name: str, shape: tuple, scale: float) -> str:
        inits.append(numpy_helper.from_array(rng.normal(0, scale, shape).astype("float32"), array_name))
        return array_name

    nodes = [
        helper.make_node("Conv", ["x", init("stem_w", (4, 3, 3, 3), 0.3)], ["stem"], pads=[1] * 4),
        helper.make_node("Relu", ["stem"], ["c0"]),
    ]
    channels = 4
    for k in range(1, layers + 1):
        scale = init(f"s{k}", (1, channels, 1, 1), 0.5)
        nodes += [
            helper.make_node("Mul", [f"c{k - 1}", scale], [f"m{k}"]),
            helper.make_node("Relu", [f"m{k}"], [f"a{k}"]),
            helper.make_node("Conv", [f"a{k}", init(f"w{k}", (3, channels, 3, 3), 0.3)], [f"h{k}_c"], pads=[1] * 4),
            helper.make_node("Relu", [f"h{k}_c"], [f"h{k}"]),
            helper.make_node("Concat", [f"c{k - 1}", f"h{k}"], [f"c{k}"], axis=1),
        ]
        channels += 3
    nodes += [
        helper.make_node("Conv", [f"c{layers}", init("t_w", (4, channels, 1, 1), 0.3)], ["t"]),
        helper.make_node("Conv", [f"h{layers}", init("side_w", (4, 3, 1, 1), 0.3)], ["side"]),
        helper.make_node("Add", ["t", "side"], ["sum"]),
        helper.make_node("GlobalAveragePool", ["sum"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["out"]),
    ]
    return graph_model(name, nodes, inits, ("x", [1, 3, 12, 12]), ("out", [1, 4]))


def kernel_calls(mod: tvm.IRModule) -> list[relax.Call]:
    return [b.value for b in main_block(mod["main"]).bindings if isinstance(b.value, relax.Call)]


def callees(mod: tvm.IRModule) -> list[str]:
    return [c.args[0].name_hint for c in kernel_calls(mod)]


def run_vm(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


@pytest.fixture(scope="module")
def fire():
    return cosched.load_onnx(fire_model("fire", seed=0), name="fire")


def one_trial_database(tenant, tmp_path_factory):
    """One trial per kernel: enough for scheduled (split, parallel, vectorized) kernels to rewrite."""
    work_dir = tmp_path_factory.mktemp(f"{tenant.name}_db")
    tuning.tune_modules([LowerKernels(TARGET)(tenant.mod)], TARGET, work_dir, trials_per_task=1, progress=False)
    return work_dir


@pytest.fixture(scope="module")
def fire_db(fire, tmp_path_factory):
    return one_trial_database(fire, tmp_path_factory)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype("float32")


def test_recognises_concatenations_by_their_block():
    """TVM's concatenation matches (scheduled or not); the same inputs swapped or another copy do not."""
    from tvm import te, topi

    from cosched.passes.concat_in_place import _concat_axis

    a, b = te.placeholder((1, 4, 4, 3), name="a"), te.placeholder((1, 4, 4, 3), name="b")
    shapes, out = [[1, 4, 4, 3]] * 2, [1, 4, 4, 6]
    concat = te.create_prim_func([a, b, topi.concatenate([a, b], 3)])
    scheduled = tvm.s_tir.Schedule(concat)
    loops = scheduled.get_loops(scheduled.get_sblock("T_concat"))
    scheduled.parallel(scheduled.fuse(*loops[:3]))
    scheduled.vectorize(loops[3])
    swapped = te.create_prim_func([a, b, topi.concatenate([b, a], 3)])
    gather = te.create_prim_func([a, b, te.compute((1, 4, 4, 6), lambda n, h, w, k: a[n, h, w, k % 3])])
    assert _concat_axis(concat, shapes, out) == 3
    assert _concat_axis(scheduled.mod["main"], shapes, out) == 3
    assert _concat_axis(swapped, shapes, out) is None
    assert _concat_axis(gather, shapes, out) is None


@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "untuned"])
def test_producers_write_into_concatenation(fire, fire_db, x, tuned):
    """The copy kernel is gone, the second producer updates the first one's output, results are equal."""
    database = fire_db if tuned else None
    plain = LowerKernels(TARGET, database, concat_in_place=False)(fire.mod)
    in_place = LowerKernels(TARGET, database, concat_in_place=True)(fire.mod)
    assert any(n.startswith("concatenate") for n in callees(plain))
    assert not any(n.startswith("concatenate") for n in callees(in_place)), callees(in_place)
    calls = kernel_calls(in_place)
    assert len(calls) == len(kernel_calls(plain)) - 1
    updates = [c for c in calls if c.op.same_as(CALL_TIR_INPLACE)]
    assert len(updates) == 1
    assert sum("_into_" in n for n in callees(in_place)) == 2, callees(in_place)
    np.testing.assert_array_equal(run_vm(in_place, x), run_vm(plain, x))


def test_default_follows_the_database(fire, fire_db):
    """Tuning extracts the kernels without a database: they must stay as the database records them."""
    assert any(n.startswith("concatenate") for n in callees(LowerKernels(TARGET)(fire.mod)))
    assert not any(n.startswith("concatenate") for n in callees(LowerKernels(TARGET, fire_db)(fire.mod)))


def test_build_can_keep_the_copy(fire, fire_db, x):
    """cosched.build(concat_in_place=False) keeps the copy kernel (for A/Bs); the bundles agree."""
    copy = cosched.build([fire], TARGET, "sequential", 1, fire_db, concat_in_place=False)
    default = cosched.build([fire], TARGET, "sequential", 1, fire_db)
    assert any(k.func.startswith("concatenate") for k in copy.schedule.kernels)
    assert not any(k.func.startswith("concatenate") for k in default.schedule.kernels)
    assert len(default.schedule.kernels) == len(copy.schedule.kernels) - 1
    inputs = {"fire": {"x": x}}
    np.testing.assert_array_equal(copy.load().run(inputs)["fire"][0], default.load().run(inputs)["fire"][0])


def test_one_kernel_feeding_two_parts(x):
    """Twin branches share their kernel; each call still writes its own part."""
    tenant = cosched.load_onnx(fire_model("twin", seed=4, twin=True), name="twin")
    plain = LowerKernels(TARGET, concat_in_place=False)(tenant.mod)
    in_place = LowerKernels(TARGET, concat_in_place=True)(tenant.mod)
    producers = [n for n in callees(in_place) if "_into_" in n]
    assert len(producers) == 2 and len(set(producers)) == 2, producers
    np.testing.assert_array_equal(run_vm(in_place, x), run_vm(plain, x))


def test_channels_first_concatenation(fire, x):
    """Channels-first kernels (the GPU layout) concatenate on axis 1: the producers shift that axis."""
    plain = LowerKernels(TARGET, channels_last=False, concat_in_place=False)(fire.mod)
    in_place = LowerKernels(TARGET, channels_last=False, concat_in_place=True)(fire.mod)
    assert not any(n.startswith("concatenate") for n in callees(in_place))
    np.testing.assert_array_equal(run_vm(in_place, x), run_vm(plain, x))


def test_part_read_by_another_producer_keeps_the_concatenation(x):
    """A part that the other parts' producers read would be passed twice to their in-place calls (as
    the slice they read and the buffer they update): nothing is rewritten."""
    tenant = cosched.load_onnx(fire_model("fire3", seed=2, concat_squeeze=True), name="fire3")
    in_place = LowerKernels(TARGET, concat_in_place=True)(tenant.mod)
    assert any(n.startswith("concatenate") for n in callees(in_place))
    assert not any(c.op.same_as(CALL_TIR_INPLACE) for c in kernel_calls(in_place))


@pytest.fixture(scope="module")
def dense():
    return cosched.load_onnx(dense_block_model("dense", seed=5), name="dense")


@pytest.fixture(scope="module")
def dense_db(dense, tmp_path_factory):
    return one_trial_database(dense, tmp_path_factory)


@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "untuned"])
def test_chained_concatenations_share_one_buffer(dense, dense_db, x, tuned):
    """DenseNet's chain: every layer's output and the block input are written once into the last
    concatenation's buffer; earlier concatenations become slices of it that their readers read."""
    database = dense_db if tuned else None
    plain = LowerKernels(TARGET, database, concat_in_place=False)(dense.mod)
    in_place = LowerKernels(TARGET, database, concat_in_place=True)(dense.mod)
    assert sum(n.startswith("concatenate") for n in callees(plain)) == 3, callees(plain)
    assert not any(n.startswith("concatenate") for n in callees(in_place)), callees(in_place)
    # Four writers (block input and three layers) of one buffer; four readers of slices of it: the
    # layers read prefixes, the side convolution the last layer's slice.
    writers = [c for c in kernel_calls(in_place) if "_into_" in c.args[0].name_hint]
    assert len(writers) == 4 and sum(c.op.same_as(CALL_TIR_INPLACE) for c in writers) == 3
    readers = [n for n in callees(in_place) if "_from_" in n]
    assert len(readers) == 4 and sum(n.endswith("_10") for n in readers) == 1, readers
    assert len(kernel_calls(in_place)) == len(kernel_calls(plain)) - 3
    np.testing.assert_array_equal(run_vm(in_place, x), run_vm(plain, x))


@pytest.mark.parametrize("returned", [True, False], ids=["part-returned", "part-internal"])
def test_part_used_outside_kernels_keeps_the_concatenation(returned):
    """A part the function returns must stay a tensor of its own: that concatenation is left alone."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 8], "float32"))
    rng = np.random.default_rng(6)
    w1, w2 = (relax.const(rng.standard_normal((8, n)).astype("float32")) for n in (5, 3))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.matmul(x, w1))
            b = bb.emit(relax.op.matmul(x, w2))
            c = bb.emit(relax.op.concat([a, b], axis=1))
            out = bb.emit_output(relax.Tuple([c, a]) if returned else relax.Tuple([c]))
        bb.emit_func_output(out)
    mod = bb.get()
    plain = LowerKernels(TARGET, concat_in_place=False)(mod)
    in_place = LowerKernels(TARGET, concat_in_place=True)(mod)
    assert any(n.startswith("concatenate") for n in callees(plain))
    assert any(n.startswith("concatenate") for n in callees(in_place)) == returned, callees(in_place)
    vms = [relax.VirtualMachine(tvm.compile(m, target=TARGET), tvm.cpu()) for m in (plain, in_place)]
    arg = tvm.runtime.tensor(rng.standard_normal((4, 8)).astype("float32"))
    for want, got in zip(vms[0]["main"](arg), vms[1]["main"](arg), strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("policy", ["tenant", "round_robin"])
@pytest.mark.parametrize("model", ["fire", "dense"])
def test_bundle_orders_the_writers(request, x, model, policy, tmp_path):
    """In a bundle the writers of one buffer are ordered, its readers follow a writer, the memory plan
    keeps it whole, outputs match, also after export and reload."""
    make = {"fire": fire_model, "dense": dense_block_model}[model]
    first = request.getfixturevalue(model)
    database = request.getfixturevalue(f"{model}_db")
    other = cosched.load_onnx(make("other", seed=3), name="other")
    bundle = cosched.compile([first, other], target=TARGET, database=database, num_streams=2, policy=policy)
    schedule = bundle.schedule
    schedule.validate()
    writers: dict[int, list[int]] = {}
    for k in schedule.kernels:
        for b in k.outputs:
            writers.setdefault(b, []).append(k.id)
    shared = {b: ks for b, ks in writers.items() if len(ks) > 1}
    assert len(shared) == 2, shared  # one concatenation (or chain of them) per tenant
    deps = schedule.dependencies()
    for ks in shared.values():
        for earlier, later in itertools.pairwise(ks):
            assert earlier in deps[later]
    for k in schedule.kernels:
        for b in set(k.args) & shared.keys():
            if b not in k.outputs:  # a reader of the buffer (or of a slice of it)
                assert set(deps[k.id]) & set(shared[b]), (k.func, deps[k.id])
    plan = plan_memory(schedule)
    for b in shared:
        assert b in plan.buffer_storage
    # Each writer touches only its slice (the search's features count those bytes): together the
    # slices fill the buffer exactly; a slice reader reads less than the whole buffer.
    by_id = {k.id: k for k in schedule.kernels}
    for b, ks in shared.items():
        slices = [by_id[w].slice_bytes[by_id[w].args.index(b)] for w in ks]
        assert sum(slices) == schedule.buffers[b].nbytes and all(s > 0 for s in slices), slices
        for k in schedule.kernels:
            if b in k.inputs and "_from_" in k.func:
                assert 0 < k.slice_bytes[k.args.index(b)] < schedule.buffers[b].nbytes
                assert schedule.kernel_bytes(k) < sum(schedule.buffers[a].nbytes for a in k.args)
    inputs = {first.name: {"x": x}, "other": {"x": x}}
    reloaded = cosched.runtime.load(bundle.export(tmp_path / "bundle"))  # schedule IR version 2 on disk
    assert [k.slice_bytes for k in reloaded.schedule.kernels] == [k.slice_bytes for k in schedule.kernels]
    for got in (bundle.run(inputs), reloaded.run(inputs)):
        for tenant in (first, other):
            expected = run_vm(LowerKernels(TARGET, database, concat_in_place=False)(tenant.mod), x)
            np.testing.assert_array_equal(got[tenant.name][0], expected)


@pytest.mark.parametrize("name", ["squeezenet", "inception_v2"])
def test_real_models_bit_identical(name):
    """SqueezeNet's fire modules and Inception-v2's four-branch blocks (twin kernels among them) lose
    every concatenation; outputs are bit-identical (a softmax over random weights hides a wrong slice
    under any tolerance: parts written at a twin's offset changed Inception-v2's by 1e-8)."""
    tenant = cosched.load_onnx(light_model(name, seed=0), name=name)
    x = make_inputs([tenant])[name][tenant.inputs[0].name]
    plain = LowerKernels(TARGET, concat_in_place=False)(tenant.mod)
    in_place = LowerKernels(TARGET, concat_in_place=True)(tenant.mod)
    assert any(n.startswith("concatenate") for n in callees(plain))
    assert not any(n.startswith("concatenate") for n in callees(in_place))
    np.testing.assert_array_equal(run_vm(in_place, x), run_vm(plain, x))


def test_densenet_chains():
    """DenseNet-121's four blocks: all 54 concatenations go, each read again (by the next layer) as a
    slice of its block's buffer. Not run here (two untuned builds take minutes); the dense-block
    tests above check the numerics, ``benchmarks/concat_ab.py`` the model's."""
    tenant = cosched.load_onnx(light_model("densenet121", seed=0), name="densenet121")
    plain = callees(LowerKernels(TARGET, concat_in_place=False)(tenant.mod))
    in_place = callees(LowerKernels(TARGET, concat_in_place=True)(tenant.mod))
    assert sum(n.startswith("concatenate") for n in plain) == 54
    assert not any(n.startswith("concatenate") for n in in_place)
    assert sum("_from_" in n for n in in_place) == 54
    assert len(in_place) == len(plain) - 54
