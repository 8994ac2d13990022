"""Learned co-schedule search: valid, never slower than sequential on measurement, model trains."""

import shutil
import types
from unittest import mock

import numpy as np
import pytest

import cosched
from cosched.compare import compare
from cosched.errors import CoschedError
from cosched.models import tiny_cnn
from cosched.schedule import Buffer, Kernel, Schedule, Stream, TenantIO
from cosched.search import (
    NUM_FEATURES,
    CostModel,
    KernelProfile,
    features,
    load_searched,
    profile_kernels,
    searched_bundle,
    simulate,
    spearman,
    thread_splits,
)
from cosched.search import measure as search_measure
from tests.conftest import make_inputs


@pytest.fixture(scope="module")
def searched(tmp_path_factory, search_models):
    work = tmp_path_factory.mktemp("search")
    tenants = [cosched.load_onnx(m, name=n) for n, m in search_models.items()]
    bundle = cosched.compile(
        tenants,
        schedule="search",
        search_options={
            "work_dir": work,
            "generations": 1,
            "population": 8,
            "measure_top": 2,
            "explore": 2,
            "repeat": 3,
        },
    )
    return bundle, tenants, work


@pytest.fixture(scope="module")
def search_models():
    return {
        n: tiny_cnn(n, seed=i, width=w, size=s)
        for i, (n, w, s) in enumerate([("a", 16, 32), ("b", 24, 24), ("c", 8, 40)])
    }


def test_search_returns_a_valid_schedule_never_slower_than_sequential(searched):
    bundle, _, work = searched
    report = bundle.search_report
    bundle.schedule.validate()
    assert report.best.measured <= 1.0  # measured relative to the sequential schedule, same batch
    assert len(report.measured) >= len(report.fixed) + 2
    # The confirming round's interval comes with a winner other than the sequential schedule itself.
    if report.best.origin.startswith("sequential/1 stream"):
        assert report.best_interval is None and report.best.measured == 1.0
    else:
        low, high = report.best_interval
        assert 0 < low <= high and "95% bootstrap" in report.summary()
    # The winner is in the IR and stored for reuse.
    assert bundle.ir["main"].attrs["cosched.strategy"] == report.best.schedule.strategy
    stored = Schedule.load(work / "searched_schedule.json")
    assert [k.id for k in stored.kernels] == [k.id for k in bundle.schedule.kernels]
    assert (work / "cost_model.json").exists()


def test_searched_bundle_computes_the_same_outputs(searched):
    bundle, tenants, _ = searched
    reference = cosched.compile(tenants, schedule="sequential", num_streams=1)
    inputs = make_inputs(tenants, seed=3)
    got, want = bundle.run(inputs), reference.run(inputs)
    for tenant in want:
        for a, b in zip(got[tenant], want[tenant], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_cost_model_trains_predicts_and_persists(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (60, 20))
    y = 0.5 + x[:, 4] - 0.3 * x[:, 5]
    model = CostModel(tmp_path / "model.json")
    for xi, yi in zip(x[:40], y[:40], strict=True):
        model.add(xi, yi)
    model.fit()
    assert spearman(list(model.predict(x[40:])), list(y[40:])) > 0.8
    model.save()
    again = CostModel(tmp_path / "model.json")
    np.testing.assert_allclose(again.predict(x[40:]), model.predict(x[40:]), rtol=1e-6)


def test_reference_runs_as_separate_copies_pooled():
    # Each built bundle takes a fixed time; the reference's copies are built first and take 1, 2, 9 ms.
    built = []

    class Fake:
        def with_schedule(self, schedule):
            ms = {"ref": [1.0, 2.0, 9.0], "x": [5.0]}[schedule][sum(b[0] == schedule for b in built)]
            built.append((schedule, ms))
            return types.SimpleNamespace(run=lambda _inputs, ms=ms: calls.append(ms))

    calls = []
    with mock.patch("time.perf_counter_ns", side_effect=lambda: 1_000_000 * sum(calls)):
        times = search_measure(Fake(), ["ref", "x"], None, repeat=3, settle_s=0, copies=3)
    assert [b[0] for b in built] == ["ref", "ref", "ref", "x"]
    assert len(calls) == 4 * (3 + 1)  # one warm-up round
    assert times == [2.0, 5.0]  # the median of the nine reference samples, not one copy's


def test_thread_splits_share_or_split_the_whole_budget():
    assert thread_splits(4, 2) == [[4, 4], [1, 3], [2, 2], [3, 1]]
    assert thread_splits(2, 3) == [[2, 2, 2], [1, 1, 1]]
    assert all(sum(s) == 6 and min(s) >= 1 for s in thread_splits(6, 3)[1:])


def test_stored_search_reloads_and_refuses_other_kernels(searched):
    bundle, tenants, work = searched
    again = load_searched(cosched.compile(tenants), work)
    assert again.schedule.to_dict() == bundle.schedule.to_dict()
    inputs = make_inputs(tenants, seed=4)
    for tenant, outs in bundle.run(inputs).items():
        for a, b in zip(outs, again.run(inputs)[tenant], strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(CoschedError, match="tenants"):
        load_searched(cosched.compile(tenants[:2]), work)
    with pytest.raises(CoschedError, match="cores"):
        load_searched(cosched.compile(tenants, cores=bundle.schedule.cores + 1), work)
    # Same tenants and count, other kernels (a retuned or changed model): the names give it away.
    other = [cosched.load_onnx(tiny_cnn(t.name, seed=9, width=4, size=16), name=t.name) for t in tenants]
    with pytest.raises(CoschedError, match="other kernels"):
        load_searched(cosched.compile(other), work)


def test_compare_runs_the_stored_searched_schedule(searched, search_models):
    _, _, work = searched
    result = compare(search_models, searched=work, repeat=3, warmup=1, log=lambda _m: None)
    names = [r.name for r in result.results]
    assert "cosched-search" in names and "ort-seq" in names
    assert [m.name for m in result.per_model] == list(search_models)
    assert all(m.ratio.value > 0 and m.ratio.low <= m.ratio.high for m in result.per_model)
    report = result.report()
    assert "TVM/ORT" in report and "cosched-search over best fixed" in report and "best cosched schedule" in report


def test_profile_measures_kernels_alone_and_in_a_group(searched):
    bundle, tenants, _ = searched
    profile = profile_kernels(bundle, make_inputs(tenants), repeat=1)
    ids = {k.id for k in bundle.schedule.kernels}
    assert set(profile.one) == set(profile.full) == ids
    if bundle.schedule.cores >= 2:
        assert set(profile.shared) == ids
    assert all(1.0 <= profile.slowdown(k) <= 4.0 for k in ids)
    assert features(bundle.schedule, profile).shape == (NUM_FEATURES,)


def test_speedup_bound_packs_kernels_on_one_core_or_all():
    # Kernel 0 scales well (10 -> 5 us): on both cores it costs 10 core-us, alone on one 12 (co-run
    # slowdown), so it stays on both. Kernel 1 scales badly (10 -> 8): 16 core-us vs 11 on one core.
    profile = KernelProfile(one={0: 10.0, 1: 10.0}, full={0: 5.0, 1: 8.0}, nbytes={}, shared={0: 12.0, 1: 11.0})
    assert profile.speedup_bound(2) == pytest.approx(2 * 13 / (10 + 11))
    assert profile.speedup_bound(1) == 1.0
    # Perfect scaling leaves nothing to gain from co-running.
    assert KernelProfile(one={0: 10.0}, full={0: 5.0}, nbytes={}).speedup_bound(2) == pytest.approx(1.0)


def _two_stream_schedule(threads: list[int], waits: dict[int, list[int]] | None = None) -> Schedule:
    """Kernel 0 on stream 0; kernels 1 and 2 on stream 1; ``waits``: kernel -> kernels it waits on."""
    buffers = [Buffer(i, [4], "float32", "intermediate", "t") for i in range(4)]
    kernels = [
        Kernel(0, "f0", "t", [0, 1], 1, stream=0, order=0),
        Kernel(1, "f1", "t", [0, 2], 1, stream=1, order=0),
        Kernel(2, "f2", "t", [2, 3], 1, stream=1, order=1),
    ]
    for k in kernels:
        k.waits = (waits or {}).get(k.id, [])
    streams = [Stream(i, t) for i, t in enumerate(threads)]
    return Schedule(kernels, buffers, [TenantIO("t", {}, [3])], streams, cores=2)


def test_simulator_grants_cores_and_lends_idle_ones_as_the_runtime_does():
    # Each kernel: 10 us on one core, 6 us on both; co-running slows kernel 1 to 12 us.
    profile = KernelProfile(
        one=dict.fromkeys(range(3), 10.0),
        full=dict.fromkeys(range(3), 6.0),
        nbytes=dict.fromkeys(range(3), 16),
        shared={0: 10.0, 1: 12.0, 2: 10.0},
    )
    # Both streams ready at once, caps of 2: the first leaves a core to the second, so kernels 0 and 1
    # run side by side on one core each (kernel 1 at its co-running speed, 10/12 done when kernel 0
    # ends); the idle core then joins kernel 1 (its last 1/6 at 6 us on both: 1 us); kernel 2 gets both.
    sim = simulate(_two_stream_schedule([2, 2]), profile)
    assert sim["makespan"] == pytest.approx(10 + 1 + 6) and sim["joined"] == pytest.approx(1)
    # With TVM's pools nothing joins: kernel 1 ends its last 1/6 alone on one core (10/6 us).
    assert simulate(_two_stream_schedule([2, 2]), profile, joining=False)["makespan"] == pytest.approx(10 + 10 / 6 + 6)
    # A cap of one core limits the grant, not the idle core joining; without joining the cap holds.
    assert simulate(_two_stream_schedule([1, 1]), profile)["makespan"] == pytest.approx(10 + 1 + 6)
    capped = simulate(_two_stream_schedule([1, 1]), profile, joining=False)
    assert capped["makespan"] == pytest.approx(10 + 10 / 6 + 10) and capped["joined"] == 0.0
    # A wait on the other stream delays kernel 2 until kernel 0 ends; the core kernel 1 leaves joins
    # kernel 0 (2/3 of 30 us on one core left: 4 us on both).
    slow = KernelProfile(**{**profile.__dict__, "one": {0: 30.0, 1: 10.0, 2: 10.0}, "shared": {}})
    sim = simulate(_two_stream_schedule([2, 2], {2: [0]}), slow)
    assert sim["makespan"] == pytest.approx(10 + 4 + 6) and sim["joined"] == pytest.approx(4)
    assert simulate(_two_stream_schedule([2, 2], {2: [0]}), slow, joining=False)["makespan"] == pytest.approx(30 + 6)
    # TVM's pools: kernel 0 runs alone on both cores; kernels 1 and 2 then run beside its stream's
    # idle, spinning pool worker (not before: with one core each, kernels 0 and 1 wake no pool worker).
    sim = simulate(_two_stream_schedule([2, 2], {1: [0]}), profile, joining=False)
    assert sim["makespan"] == pytest.approx(6 + 6 + 6) and sim["spin_exposed"] == pytest.approx(6 + 6)
    assert simulate(_two_stream_schedule([2, 2]), profile, joining=False)["spin_exposed"] == 0.0
    assert simulate(_two_stream_schedule([2, 2], {1: [0]}), profile)["spin_exposed"] == 0.0
    # One stream gets the whole budget.
    one_stream = _two_stream_schedule([2, 2])
    for k in one_stream.kernels:
        k.stream, k.order = 0, k.id
    one_stream.streams = [Stream(0, 2)]
    assert simulate(one_stream, profile)["makespan"] == pytest.approx(18)


@pytest.mark.parametrize("ratio, wins", [(0.7, True), (0.97, False)])
def test_a_winner_is_faster_than_sequential_beyond_the_noise(searched, ratio, wins):
    """With measurements faked (one-stream schedules 10 ms, the others ``ratio`` times that, each
    spread +-15%), several streams win only when they are faster beyond the interval."""
    from cosched import bench
    from cosched import search as search_module

    _, tenants, _ = searched
    bundle = cosched.compile(tenants)

    def fake(bundle, schedules, inputs, repeat, settle_s=0.0, copies=1, quiet=True):
        spread = np.linspace(0.85, 1.15, repeat)
        return [
            bench.Result.from_samples(
                str(j),
                list(10.0 * (1.0 if s.num_streams == 1 else ratio) * np.random.default_rng(j).permutation(spread)),
            )
            for j, s in enumerate(schedules)
        ]

    options = {"generations": 1, "population": 8, "measure_top": 2, "explore": 1, "repeat": 8}
    with mock.patch.object(search_module, "_measure_results", fake):
        report = search_module.search(bundle, make_inputs(tenants), **options)
    if wins:
        assert report.best.schedule.num_streams > 1 and report.best.measured == pytest.approx(ratio)
        assert report.best_interval[1] < 1.0
    else:
        assert report.best.origin == "sequential/1 stream" and report.best_interval is None
        assert any(r < 1.0 for _, r in report.confirmed)  # a finalist was faster, within the noise


def test_no_simulated_schedule_beats_the_profile_bound():
    """The simulator and ``KernelProfile.speedup_bound`` agree: over random profiles, caps and waits,
    no replayed schedule gains more over sequential than the bound, lending idle cores or not."""
    import random

    rng = random.Random(0)
    for _ in range(500):
        full = {k: rng.uniform(1, 10) for k in range(3)}
        one = {k: full[k] * rng.uniform(1.0, 2.0) for k in range(3)}
        shared = {k: one[k] * rng.uniform(1.0, 1.5) for k in range(3)}
        profile = KernelProfile(one=one, full=full, nbytes=dict.fromkeys(range(3), 16), shared=shared)
        schedule = _two_stream_schedule(rng.choice([[2, 2], [1, 1], [1, 2]]), rng.choice([None, {2: [0]}, {1: [0]}]))
        for joining in (True, False):
            gain = sum(full.values()) / simulate(schedule, profile, joining)["makespan"]
            assert gain <= profile.speedup_bound(2) * (1 + 1e-9)


def test_search_report_states_the_profile_bound(searched):
    report = searched[0].search_report
    assert report.speedup_bound is not None and report.speedup_bound >= 1.0
    assert "estimate of the most any schedule gains over sequential" in report.summary()


def test_a_new_search_has_to_beat_the_stored_winner(searched, tmp_path):
    _, tenants, work = searched
    shutil.copytree(work, tmp_path / "work")
    fresh = cosched.compile(tenants)
    options = {"generations": 0, "repeat": 2, "confirm": 1, "reference_copies": 1}
    _, report = searched_bundle(fresh, make_inputs(tenants), work_dir=tmp_path / "work", **options)
    assert "stored" in [c.origin for c in report.measured]  # measured in round 0 ...
    assert "stored" in [origin for origin, _ in report.confirmed]  # ... and in the confirming round
    assert "stored" not in report.fixed
    assert "confirmed side by side" in report.summary()
    # Without a stored schedule there is nothing to beat.
    _, report = searched_bundle(fresh, make_inputs(tenants), work_dir=tmp_path / "empty", **options)
    assert "stored" not in [c.origin for c in report.measured]
