"""Tuning: shared workloads are tuned once, the database applies, is target-checked and resumable.

Two tiny tenants share one conv workload; one or two trials per task keep the file fast.
"""

import os

# Before TVM creates a thread pool: pinning would put MetaSchedule's search threads on one core.
os.environ.setdefault("TVM_BIND_THREADS", "0")

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from cosched import tuning, tuning_db, tuning_measure
from cosched.errors import CoschedError
from cosched.models import graph_model
from cosched.passes import LowerKernels
from cosched.target import host_target
from cosched.tenant import load_onnx

NAMES = ["a", "b"]
TARGET = host_target()
REPO = Path(__file__).resolve().parent.parent


def conv_model(name: str, seed: int, second_conv: bool) -> onnx.ModelProto:
    """relu(conv3x3(x)) with x: 1x4x16x16, then optionally a 1x1 conv to 16 channels.

    Both tenants' first conv has the same shape, so it is one workload (weights are parameters).
    """
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype("float32"), "w")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r" if second_conv else "y"]),
    ]
    channels = 8
    if second_conv:
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 8, 1, 1)).astype("float32"), "w2"))
        nodes.append(helper.make_node("Conv", ["r", "w2"], ["y"]))
        channels = 16
    return graph_model(name, nodes, inits, ("x", [1, 4, 16, 16]), ("y", [1, channels, 16, 16]))


def lowered_modules() -> list[tvm.IRModule]:
    """The two tenants after the zero pipeline: 3 tasks, 2 distinct workloads."""
    protos = [conv_model("a", 1, False), conv_model("b", 2, True)]
    return [relax.get_pipeline("zero")(load_onnx(p, name=n).mod) for p, n in zip(protos, NAMES, strict=True)]


def records_by_workload(work_dir: Path) -> dict[int, int]:
    """Record count per workload index, straight from the JSON lines."""
    counts: dict[int, int] = {}
    for line in (work_dir / tuning_db.RECORD_FILE).read_text().splitlines():
        if line.strip():
            index = json.loads(line)[0]
            counts[index] = counts.get(index, 0) + 1
    return counts


@pytest.fixture(scope="module")
def mods():
    return lowered_modules()


@pytest.fixture(scope="module")
def tuned(mods, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("tuned")
    report = tuning.tune_modules(mods, TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False)
    return work_dir, report


def test_extract_merges_shared_workload(mods):
    tasks = tuning.extract_tasks(mods, TARGET, NAMES)
    assert sum(len(t.users) for t in tasks) == 3
    assert len(tasks) == 2
    shared = [t for t in tasks if len(t.users) == 2]
    assert len(shared) == 1
    assert shared[0].users == NAMES and shared[0].weight == 2 and shared[0].flops > 0


def test_shared_workload_tuned_once(tuned):
    work_dir, report = tuned
    assert (report.tasks_total, report.tasks_deduped, report.dedup_saved) == (3, 2, 1)
    assert report.tasks_tuned == 2 and report.trials_run == 2
    # One workload entry and one record per distinct task: the shared conv was not tuned twice.
    workloads = (work_dir / tuning_db.WORKLOAD_FILE).read_text().splitlines()
    assert len(workloads) == 2
    assert sorted(records_by_workload(work_dir).values()) == [1, 1]
    assert len(report.best_us) == 2 and all(us > 0 for us in report.best_us.values())
    meta = json.loads((work_dir / tuning_db.META_FILE).read_text())
    assert meta["target"] == {"kind": "llvm", "mcpu": TARGET.attrs["mcpu"]}
    tuning_db.check_database(work_dir, TARGET)


def test_database_applies(tuned, mods):
    work_dir, _ = tuned
    mod = mods[1]
    with TARGET, ms.database.JSONDatabase(work_dir=str(work_dir)):
        applied = relax.transform.MetaScheduleApplyDatabase()(mod)
    prims = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    changed = [n for n in prims if not tvm_ffi.structural_equal(mod[n], applied[n])]
    assert len(changed) == 2, f"no tuned schedule applied ({prims})"
    # The tuned kernels compute the same thing.
    x = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype("float32")
    outs = []
    for m in (mod, applied):
        vm = relax.VirtualMachine(tvm.compile(m, TARGET), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_wrong_target_refused(tuned, mods, tmp_path):
    work_dir, _ = tuned
    other = tvm.target.Target(
        {"kind": "llvm", "mcpu": "cascadelake" if TARGET.attrs["mcpu"] != "cascadelake" else "znver4", "num-cores": 2}
    )
    with pytest.raises(CoschedError, match="tuned for"):
        tuning_db.check_database(work_dir, other)
    with pytest.raises(CoschedError, match="tuned for"):
        tuning.tune_modules(mods, other, work_dir, trials_per_task=1, progress=False)
    with pytest.raises(CoschedError, match="no tuning database"):
        tuning_db.check_database(tmp_path / "missing", TARGET)
    shutil.copy(work_dir / tuning_db.WORKLOAD_FILE, tmp_path / tuning_db.WORKLOAD_FILE)
    shutil.copy(work_dir / tuning_db.RECORD_FILE, tmp_path / tuning_db.RECORD_FILE)
    with pytest.raises(CoschedError, match="target is unknown"):
        tuning_db.check_database(tmp_path, TARGET)


def test_compact_keeps_best_and_done(tuned, mods, tmp_path):
    work_dir, report = tuned
    copy = tmp_path / "db"
    shutil.copytree(work_dir, copy)
    assert tuning_db.compact_database(copy) == 2
    again = tuning.tune_modules(mods, TARGET, copy, trials_per_task=1, names=NAMES, progress=False)
    assert again.tasks_tuned == 0 and again.trials_run == 0 and again.tasks_skipped == 2
    assert again.best_us == pytest.approx(report.best_us)


def test_compact_keep_drops_other_workloads(tuned, mods, tmp_path):
    work_dir, report = tuned
    copy = tmp_path / "db"
    shutil.copytree(work_dir, copy)
    tasks = tuning.extract_tasks(mods, TARGET, NAMES)
    shared = [t for t in tasks if len(t.users) == 2]
    assert tuning_db.compact_database(copy, keep=shared) == 1
    assert len((copy / tuning_db.WORKLOAD_FILE).read_text().splitlines()) == 1
    meta = json.loads((copy / tuning_db.META_FILE).read_text())
    assert list(meta["trials"]) == [shared[0].key]
    # The kept workload is still done and keeps its best; the dropped one is tuned again.
    again = tuning.tune_modules(mods, TARGET, copy, trials_per_task=1, names=NAMES, progress=False)
    assert again.tasks_skipped == 1 and again.tasks_tuned == 1
    assert again.best_us[shared[0].name] == pytest.approx(report.best_us[shared[0].name])


def test_measured_time_decides_the_order_once_every_kernel_has_a_record(tuned, mods, tmp_path, monkeypatch):
    work_dir, _ = tuned
    copy = tmp_path / "db"
    shutil.copytree(work_dir, copy)
    tasks = sorted(tuning.extract_tasks(mods, TARGET, NAMES), key=lambda t: t.cost, reverse=True)
    # Pretend the kernel with fewer FLOPs measured slower: it must get the next trial.
    slow = {tasks[0].key: 1.0, tasks[1].key: 1000.0}
    monkeypatch.setattr(tuning, "best_us", lambda db, task: slow[task.key])
    report = tuning.tune_modules(mods, TARGET, copy, trials_per_task=2, names=NAMES, progress=False, max_tasks=1)
    assert report.tasks_tuned == 1
    counts = tuning_db.records_per_workload(tuning_db.open_database(copy), tasks)
    assert (counts[tasks[0].key], counts[tasks[1].key]) == (1, 2)


_CHILD = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_tuning import NAMES, TARGET, lowered_modules
from cosched import tuning
tuning.tune_modules(lowered_modules(), TARGET, {work_dir!r}, trials_per_task=1, names=NAMES, progress=False)
"""


def test_killed_run_resumes(tmp_path):
    """Kill a tuning process after its first task; the rerun keeps every record and skips that task."""
    work_dir = tmp_path / "db"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO), work_dir=str(work_dir))],
        env={**os.environ, "TVM_BIND_THREADS": "0"},
    )
    meta_file = work_dir / tuning_db.META_FILE
    finished: dict = {}
    deadline = time.monotonic() + 120
    try:
        while not finished and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            if meta_file.is_file():
                finished = json.loads(meta_file.read_text()).get("trials", {})
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert finished, "the tuning process finished no task"
    before = records_by_workload(work_dir)
    # A kill mid-write leaves half a line; the database must still open.
    with open(work_dir / tuning_db.RECORD_FILE, "a") as f:
        f.write('[0, [[["half a record"')

    report = tuning.tune_modules(lowered_modules(), TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False)
    after = records_by_workload(work_dir)
    assert report.tasks_skipped >= len(finished) >= 1
    assert report.tasks_skipped + report.tasks_tuned == 2 and report.tasks_left == 0
    for index, count in before.items():
        assert after[index] >= count  # no record lost
    # The task finished before the kill was not tuned again; every task has its record now.
    assert sum(after.values()) == sum(before.values()) + report.trials_run
    assert len(after) == 2 and len(report.best_us) == 2
    rerun = tuning.tune_modules(lowered_modules(), TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False)
    assert rerun.tasks_tuned == 0 and rerun.trials_run == 0
    assert records_by_workload(work_dir) == after


def test_spent_budget_starts_no_task(mods, tmp_path):
    report = tuning.tune_modules(
        mods, TARGET, tmp_path, trials_per_task=1, time_budget_s=0, names=NAMES, progress=False
    )
    assert report.tasks_tuned == 0 and report.tasks_left == 2 and report.trials_run == 0


def test_prepacked_weights_tuned_and_exact(tmp_path):
    """On CPU, tuned kernels read weights repacked at compile time; outputs do not change."""
    import cosched

    tenant = load_onnx(conv_model("b", 2, True), name="b")
    tuning.tune_modules([LowerKernels(TARGET)(tenant.mod)], TARGET, tmp_path, trials_per_task=1, progress=False)
    lowered = LowerKernels(TARGET, tmp_path)(tenant.mod)
    kernels = [gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any(k.endswith("_prepacked") for k in kernels), kernels
    # The repacking itself ran at compile time: main calls the two convolutions and, as the model is
    # NHWC inside (ChannelsLast), its input's and output's transposes, nothing else.
    assert len([k for k in kernels if not k.startswith("transpose")]) == 2, kernels
    assert len(kernels) <= 4, kernels
    x = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype("float32")
    untuned = cosched.compile([tenant], target=TARGET).run({"b": {"x": x}})["b"][0]
    bundle = cosched.compile([tenant], target=TARGET, database=tmp_path)
    tuned = bundle.run({"b": {"x": x}})["b"][0]
    np.testing.assert_allclose(tuned, untuned, rtol=1e-4, atol=1e-4)
    # Tuned kernels have parallel loops, which run on the executor's helpers unless told otherwise.
    assert bundle.loops_on_helpers
    bundle.parallel = "tvm"
    assert not bundle.loops_on_helpers
    np.testing.assert_array_equal(bundle.run({"b": {"x": x}})["b"][0], tuned)


def test_the_search_times_a_one_core_stream_on_one_core(tmp_path, monkeypatch):
    """The search's kernel profile caps a stream at one core for real: no helper joins its loops."""
    import cosched
    from cosched import search
    from cosched.runtime.bundle import Bundle

    tenants = [load_onnx(conv_model(n, i, True), name=n) for i, n in enumerate("ab")]
    mods = [LowerKernels(TARGET)(t.mod) for t in tenants]
    tuning.tune_modules(mods, TARGET, tmp_path, trials_per_task=1, progress=False)
    bundle = cosched.compile(tenants, target=TARGET, database=tmp_path, cores=2)
    assert bundle.loops_on_helpers
    profiled = []
    real = Bundle.profile

    def spy(self, inputs, warmup=1):
        profiled.append((tuple(s.threads for s in self.schedule.streams), self.loops_on_helpers))
        return real(self, inputs, warmup)

    monkeypatch.setattr(Bundle, "profile", spy)
    profile = search.profile_kernels(bundle, bundle.random_inputs(), repeat=1)
    assert sorted(set(profiled)) == [((1,), False), ((1, 1), False), ((2,), True)]
    assert profile.one.keys() == profile.full.keys() == profile.shared.keys()


def test_database_without_matching_records_warns(tuned, caplog):
    """A database from other models applies to nothing: say so instead of running untuned silently."""

    work_dir, _ = tuned  # tuned without prepacking, so none of its workloads match
    tenant = load_onnx(conv_model("b", 2, True), name="b")
    with caplog.at_level("WARNING"):
        LowerKernels(TARGET, work_dir)(tenant.mod)
    assert "has a record for none of the" in caplog.text


def test_early_stop_ends_stale_tasks(mods, tmp_path):
    """With patience 2 and a gain nothing reaches, each task stops after its first 1 + 2 trials."""
    report = tuning.tune_modules(
        mods, TARGET, tmp_path, trials_per_task=4, names=NAMES, progress=False, patience=2, min_gain=0.99
    )
    assert report.tasks_tuned == 2 and report.tasks_stopped_early == 2
    assert report.trials_run == 6 and report.trials_saved == 2 * 4 - 6
    assert sorted(records_by_workload(tmp_path).values()) == [3, 3]
    # A stopped task is complete: the rerun spends nothing on it.
    again = tuning.tune_modules(mods, TARGET, tmp_path, trials_per_task=4, names=NAMES, progress=False)
    assert again.tasks_tuned == 0 and again.trials_run == 0


def test_patience_grows_with_the_trials_had(mods, tmp_path):
    """A workload that had 8 trials waits 8 / 2 = 4 stale trials, not 2, before it stops."""
    tuning.tune_modules(mods, TARGET, tmp_path, trials_per_task=8, names=NAMES, progress=False, patience=None)
    report = tuning.tune_modules(
        mods, TARGET, tmp_path, trials_per_task=16, names=NAMES, progress=False, patience=2, min_gain=0.99
    )
    assert report.tasks_tuned == 2 and report.tasks_stopped_early == 2
    assert report.trials_run == 2 * 4 and report.trials_saved == 2 * (16 - 8 - 4)
    assert sorted(records_by_workload(tmp_path).values()) == [12, 12]


def test_search_size_sets_the_population_per_batch(mods, tmp_path, monkeypatch):
    size = tuning.SearchSize(per_trial=16, generations=1, min_population=32, max_population=512)
    assert [size.strategy(n).population_size for n in (1, 4, 64)] == [32, 64, 512]
    assert size.strategy(4).genetic_num_iters == 1
    assert tuning.PREVIOUS_SEARCH_SIZE.strategy(2).population_size == 128
    # tune_modules sizes each task's search with the size it is given, for the batch it measures.
    asked = []
    strategy = tuning.SearchSize.strategy
    monkeypatch.setattr(tuning.SearchSize, "strategy", lambda self, n: asked.append((self, n)) or strategy(self, n))
    small = tuning.SearchSize(per_trial=4, min_population=8)
    report = tuning.tune_modules(mods, TARGET, tmp_path, trials_per_task=2, names=NAMES, progress=False, search=small)
    assert report.trials_run == 4
    assert asked == [(small, 2), (small, 2)]


def _record_runner_configs(monkeypatch) -> list:
    """The evaluator config of every LocalRunner tuning creates from now on, in order."""
    configs = []
    real_runner = tuning.ms.runner.LocalRunner

    def runner(*args, evaluator_config=None, **kwargs):
        configs.append(evaluator_config)
        return real_runner(*args, evaluator_config=evaluator_config, **kwargs)

    monkeypatch.setattr(tuning.ms.runner, "LocalRunner", runner)
    return configs


def test_cache_flush_reaches_the_runner(mods, tmp_path, monkeypatch):
    configs = _record_runner_configs(monkeypatch)
    report = tuning.tune_modules(mods, TARGET, tmp_path, trials_per_task=1, names=NAMES, progress=False)
    assert configs == [None] and report.trials_run == 2
    flushed = tmp_path / "flushed"
    report = tuning.tune_modules(
        mods, TARGET, flushed, trials_per_task=1, names=NAMES, progress=False, cache_flush=True
    )
    assert configs[1] is not None and configs[1].enable_cpu_cache_flush and report.trials_run == 2
    assert len(report.best_us) == 2  # the flushed runs measured


def test_cold_timing_flushes_before_every_timed_run():
    """TVM flushes once per repeat and a repeat runs for ``min_repeat_ms``: cold means one run per repeat."""
    config = tuning_measure.cold_evaluator()
    assert config.enable_cpu_cache_flush
    assert config.number == 1 and config.min_repeat_ms == 0  # no warm runs after the flush
    assert config.repeat == tuning_measure.COLD_RUNS > 1  # the mean of several cold runs, not one


def test_trial_ladder_covers_every_workload_before_going_deeper():
    assert tuning.trial_ladder(2, 32) == [2, 8, 32]
    assert tuning.trial_ladder(2, 8) == [2, 8]
    assert tuning.trial_ladder(2, 20) == [2, 8, 20]
    assert tuning.trial_ladder(2, 2) == [2] and tuning.trial_ladder(2, 1) == [1]


def test_tune_opens_the_database_once_for_all_passes(tmp_path, monkeypatch):
    """Opening replays every record (about 3 ms each here): one run opens it once, not once per pass."""
    opened = []
    real_open = tuning_db.open_database
    # Every module that calls it binds the name: count the opens of all of them.
    for module in (tuning, tuning_db, tuning_measure):
        monkeypatch.setattr(module, "open_database", lambda work_dir: opened.append(work_dir) or real_open(work_dir))
    tenants = [load_onnx(conv_model(n, i, i == 1), name=n) for i, n in enumerate(NAMES)]
    report = tuning.tune(tenants, TARGET, tmp_path, trials=2, first_trials=1, progress=False, patience=None)
    workloads = len(tuning.extract_tasks([LowerKernels(TARGET)(t.mod) for t in tenants], TARGET))
    assert report.trials_run == 2 * workloads  # two passes (1, then 2 trials) over every workload
    assert len(opened) == 1
    assert sorted(records_by_workload(tmp_path).values()) == [1] * workloads  # compacted to the best


def test_max_tasks_tunes_only_the_costliest(tmp_path):
    """A deep pass on a few workloads: ``max_tasks`` caps each pass at the costliest ones."""
    tenants = [load_onnx(conv_model(n, i, i == 1), name=n) for i, n in enumerate(NAMES)]
    report = tuning.tune(tenants, TARGET, tmp_path, trials=1, progress=False, patience=None, max_tasks=1)
    tasks = tuning.extract_tasks([LowerKernels(TARGET)(t.mod) for t in tenants], TARGET, NAMES)
    costliest = max(tasks, key=lambda t: t.cost)
    db = tuning_db.open_database(tmp_path)
    assert report.trials_run == 1 and report.tasks_left == len(tasks) - 1
    assert [t.name for t in tasks if tuning_db.best_us(db, t) is not None] == [costliest.name]


def test_kernels_tunes_only_the_named_workloads(tmp_path):
    """``kernels`` picks workloads by kernel name (as a profile names them), not by cost; a name
    that matches nothing is refused before anything is timed."""
    tenants = [load_onnx(conv_model(n, i, i == 1), name=n) for i, n in enumerate(NAMES)]
    tasks = tuning.extract_tasks([LowerKernels(TARGET)(t.mod) for t in tenants], TARGET, NAMES)
    convs = sorted((t for t in tasks if "conv2d" in t.name), key=lambda t: t.cost)
    assert len(convs) == 2
    chosen = convs[0]  # the cheaper: not what cost order would pick
    kernel = chosen.name.split(".", 1)[1]
    report = tuning.tune(tenants, TARGET, tmp_path, trials=1, progress=False, patience=None, kernels=[kernel])
    db = tuning_db.open_database(tmp_path)
    assert report.trials_run == 1 and report.tuned == [chosen.name] and report.tasks_tuned == 1
    assert [t.name for t in tasks if tuning_db.best_us(db, t) is not None] == [chosen.name]
    assert report.best_before_us == {}
    first = tuning_db.best_us(db, chosen)
    again = tuning.tune(tenants, TARGET, tmp_path, trials=2, progress=False, patience=None, kernels=[kernel])
    assert again.tuned == [chosen.name] and again.best_before_us == {chosen.name: first}
    assert again.best_us[chosen.name] <= first
    # Whole names only: a prefix of the kernels' names picks none of them by accident.
    with pytest.raises(CoschedError, match="no kernel of these models is named 'fused_conv2d'") as err:
        tuning.tune(tenants, TARGET, tmp_path / "typo", trials=1, progress=False, kernels=["fused_conv2d"])
    assert "kernel_breakdown" in err.value.hint
    assert not (tmp_path / "typo").exists()
    assert {t.name for t in tuning.select_kernels(tasks, [".*conv2d.*"])} == {t.name for t in convs}


def two_conv_model() -> onnx.ModelProto:
    """Two 3x3 conv+relu of different widths: one operator family, two workloads."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype("float32"), "w1"),
        numpy_helper.from_array(rng.standard_normal((12, 8, 3, 3)).astype("float32"), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "twoconv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 16, 16])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_nearest_tiling_keeps_fitting_factors_and_refits_others():
    assert tuning.nearest_tiling(64, [1, 4, 8, 2]) == [1, 4, 8, 2]
    tiles = tuning.nearest_tiling(48, [1, 4, 8, 2])
    assert np.prod(tiles) == 48 and len(tiles) == 4 and tiles[-1] == 2
    assert tuning.nearest_tiling(12, [2, 16], max_innermost=4)[-1] <= 4


def test_transfer_seeds_a_new_workload_from_its_family(tmp_path):
    tenant = load_onnx(two_conv_model(), name="t")
    mod = LowerKernels(TARGET)(tenant.mod)
    tasks = tuning.extract_tasks([mod], TARGET, ["t"])
    assert len({tuning.family(t) for t in tasks if "conv" in t.name}) == 1
    report = tuning.tune_modules([mod], TARGET, tmp_path, trials_per_task=2, names=["t"], progress=False, transfer=True)
    # The second conv workload measured its relative's best schedule, refitted, as one of its trials.
    assert report.trials_transferred >= 1
    assert report.trials_run == 2 * report.tasks_tuned + report.trials_injective
    # Transferred schedules are correct schedules.
    assert_tuned_computes_as_untuned(tenant, tmp_path, (1, 4, 16, 16))


def assert_tuned_computes_as_untuned(tenant, database: Path, shape: tuple[int, ...]) -> None:
    """The tenant compiled with ``database`` computes what it does untuned, on one random input."""
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    outs = [
        relax.VirtualMachine(tvm.compile(LowerKernels(TARGET, db)(tenant.mod), TARGET), tvm.cpu())["main"](
            tvm.runtime.tensor(x)
        ).numpy()
        for db in (None, database)
    ]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_runner_times_candidates_on_the_target_cores():
    """TVM's pool defaults to half the cores: the runner's worker must be told the target's count."""
    runner = tuning_measure.local_runner(3, cache_flush=False)
    try:
        assert runner.pool.submit(os.getenv, "TVM_NUM_THREADS").result() == "3"
    finally:
        runner.pool.shutdown()


def _as_measured_elsewhere(work_dir: Path, secs: float) -> None:
    """Make ``work_dir`` look tuned before cosched recorded the thread count, each record timed at ``secs``."""
    meta = json.loads((work_dir / tuning_db.META_FILE).read_text())
    del meta["threads"]
    (work_dir / tuning_db.META_FILE).write_text(json.dumps(meta))
    lines = []
    for line in (work_dir / tuning_db.RECORD_FILE).read_text().splitlines():
        rec = json.loads(line)
        rec[1][1] = [secs]
        lines.append(json.dumps(rec))
    (work_dir / tuning_db.RECORD_FILE).write_text("\n".join(lines) + "\n")


def test_database_measured_on_other_threads_is_timed_again(tuned, mods, tmp_path):
    work_dir = tmp_path / "db"
    shutil.copytree(tuned[0], work_dir)
    assert json.loads((work_dir / tuning_db.META_FILE).read_text())["threads"] == tuning_measure.num_cores(TARGET)
    _as_measured_elsewhere(work_dir, 1.0)
    report = tuning.tune_modules(mods, TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False)
    assert report.records_remeasured == 2 and report.trials_run == 0  # timed again, not tuned again
    assert all(us < 1e5 for us in report.best_us.values())  # the stale 1 s timings are gone
    assert json.loads((work_dir / tuning_db.META_FILE).read_text())["threads"] == tuning_measure.num_cores(TARGET)
    assert sorted(records_by_workload(work_dir).values()) == [1, 1]
    again = tuning.tune_modules(mods, TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False)
    assert again.records_remeasured == 0


def test_database_timed_warm_is_timed_again_before_tuning_with_cache_flush(tuned, mods, tmp_path, monkeypatch):
    """Cold timings are slower than warm ones: mixed in one database, the warm records would always win."""
    work_dir = tmp_path / "db"
    shutil.copytree(tuned[0], work_dir)
    meta = json.loads((work_dir / tuning_db.META_FILE).read_text())
    assert meta["cache_flush"] is False
    configs = _record_runner_configs(monkeypatch)
    report = tuning.tune_modules(
        mods, TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False, cache_flush=True
    )
    assert report.records_remeasured == 2 and report.trials_run == 0
    assert configs and configs[0].enable_cpu_cache_flush  # the records were timed cold
    assert json.loads((work_dir / tuning_db.META_FILE).read_text())["cache_flush"] is True
    again = tuning.tune_modules(
        mods, TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False, cache_flush=True
    )
    assert again.records_remeasured == 0
    # And back: tuning warm times them warm again.
    warm = tuning.tune_modules(mods, TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False)
    assert warm.records_remeasured == 2
    assert json.loads((work_dir / tuning_db.META_FILE).read_text())["cache_flush"] is False
    db = tuning_db.open_database(work_dir)
    with pytest.raises(CoschedError, match="cache flush"):
        tuning.tune_modules(mods, TARGET, work_dir, names=NAMES, progress=False, database=db, cache_flush=True)


def test_database_flushed_once_per_repeat_is_timed_again_cold(tuned, mods, tmp_path, monkeypatch):
    """Before ``cold_evaluator`` a database tuned with cache flush was timed warm: it is timed again."""
    work_dir = tmp_path / "db"
    shutil.copytree(tuned[0], work_dir)
    meta = json.loads((work_dir / tuning_db.META_FILE).read_text())
    meta["cache_flush"] = True  # as cosched wrote it then: no cold_runs
    (work_dir / tuning_db.META_FILE).write_text(json.dumps(meta))
    configs = _record_runner_configs(monkeypatch)
    report = tuning.tune_modules(
        mods, TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False, cache_flush=True
    )
    assert report.records_remeasured == 2 and report.trials_run == 0
    assert configs[0].number == 1 and configs[0].min_repeat_ms == 0
    meta = json.loads((work_dir / tuning_db.META_FILE).read_text())
    assert meta["cache_flush"] is True and meta["cold_runs"] == tuning_measure.COLD_RUNS
    warm = tuning.tune_modules(mods, TARGET, work_dir, trials_per_task=1, names=NAMES, progress=False)
    assert warm.records_remeasured == 2
    assert "cold_runs" not in json.loads((work_dir / tuning_db.META_FILE).read_text())


def test_remeasure_that_times_nothing_leaves_the_database(tuned, tmp_path, monkeypatch):
    work_dir = tmp_path / "db"
    shutil.copytree(tuned[0], work_dir)
    _as_measured_elsewhere(work_dir, 1.0)
    before = {f: (work_dir / f).read_bytes() for f in (tuning_db.RECORD_FILE, tuning_db.META_FILE)}
    monkeypatch.setattr(tuning_measure, "mean_us", lambda result: None)  # every run failed
    with pytest.raises(CoschedError, match="could be timed again"):
        tuning_measure.remeasure_database(work_dir, TARGET)
    assert {f: (work_dir / f).read_bytes() for f in before} == before


def test_a_database_starts_from_another_cpus_records(tuned, mods, tmp_path):
    """Records tuned on another CPU are timed here again, kept as each workload's start, and tuned on."""
    source = tmp_path / "other_cpu"
    shutil.copytree(tuned[0], source)
    other = "cascadelake" if TARGET.attrs["mcpu"] != "cascadelake" else "znver4"
    meta = json.loads((source / tuning_db.META_FILE).read_text())
    meta["target"] = {"kind": "llvm", "mcpu": other}
    (source / tuning_db.META_FILE).write_text(json.dumps(meta))
    _as_measured_elsewhere(source, 1.0)
    before = {f: (source / f).read_bytes() for f in (tuning_db.RECORD_FILE, tuning_db.META_FILE)}
    with pytest.raises(CoschedError, match="tuned for"):
        tuning_db.check_database(source, TARGET)  # as it is, it is refused for this CPU

    work_dir = tmp_path / "here"
    report = tuning.tune_modules(
        mods, TARGET, work_dir, trials_per_task=2, names=NAMES, progress=False, start_from=source
    )
    assert report.records_remeasured == 2  # timed here, not trusted from the other CPU
    assert report.trials_run == 2  # trial counts are not carried over: each workload is tuned on
    assert all(us < 1e5 for us in report.best_us.values())  # the other CPU's 1 s timings are gone
    assert sorted(records_by_workload(work_dir).values()) == [2, 2]
    meta = json.loads((work_dir / tuning_db.META_FILE).read_text())
    assert meta["started_from"] == {"path": str(source), "target": {"kind": "llvm", "mcpu": other}}
    assert meta["threads"] == tuning_measure.num_cores(TARGET)
    tuning_db.check_database(work_dir, TARGET)
    assert {f: (source / f).read_bytes() for f in before} == before

    # A rerun resumes its own records rather than starting over.
    again = tuning.tune_modules(
        mods, TARGET, work_dir, trials_per_task=2, names=NAMES, progress=False, start_from=source
    )
    assert (again.records_remeasured, again.trials_run) == (0, 0)
    assert sorted(records_by_workload(work_dir).values()) == [2, 2]

    cuda = {**json.loads(before[tuning_db.META_FILE]), "target": {"kind": "cuda", "arch": "sm_90"}}
    (source / tuning_db.META_FILE).write_text(json.dumps(cuda))
    with pytest.raises(CoschedError, match="same kind of device"):
        tuning.tune_modules(mods, TARGET, tmp_path / "fresh", trials_per_task=1, progress=False, start_from=source)
    with pytest.raises(CoschedError, match="no tuning database"):
        tuning.tune_modules(
            mods, TARGET, tmp_path / "fresh", trials_per_task=1, progress=False, start_from=tmp_path / "missing"
        )
    assert not (tmp_path / "fresh" / tuning_db.RECORD_FILE).exists()
