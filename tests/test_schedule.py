"""The schedule IR: dependencies respected, minimal waits, JSON round trip, validation catches errors."""

import itertools

import pytest
import tvm

from cosched import CoschedError
from cosched.compiler import lower_tenants, schedule_module
from cosched.extract import extract_schedule
from cosched.schedule import Kernel, Schedule, assign_waits
from cosched.target import host_target


@pytest.fixture(scope="module")
def lowered(demo_tenants):
    return lower_tenants(demo_tenants, host_target())


@pytest.mark.parametrize(
    ("strategy", "num_streams", "policy"),
    list(
        itertools.product(
            ["sequential", "round_robin", "breadth_first"], [1, 2, 3, 4], ["auto", "balanced", "round_robin"]
        )
    ),
)
def test_every_schedule_is_valid_and_minimal(lowered, strategy, num_streams, policy):
    schedule, _ = extract_schedule(schedule_module(lowered, strategy, num_streams, policy))
    schedule.validate()  # raises on a violated dependency, bad order or a redundant wait
    assert schedule.redundant_waits() == []
    deps = schedule.dependencies()
    clocks = schedule.clocks()
    by_id = {k.id: k for k in schedule.kernels}
    for kid, ds in deps.items():
        for d in ds:
            assert clocks[kid][by_id[d].stream] >= by_id[d].order
    # Every wait serves a dependency on another stream.
    for k in schedule.kernels:
        for w in k.waits:
            assert by_id[w].stream != k.stream


def test_round_robin_policy_needs_waits_and_tenant_policy_none(lowered):
    spread, _ = extract_schedule(schedule_module(lowered, "breadth_first", 3, "round_robin"))
    per_tenant, _ = extract_schedule(schedule_module(lowered, "breadth_first", 3, "tenant"))
    assert sum(len(k.waits) for k in spread.kernels) > 0
    assert sum(len(k.waits) for k in per_tenant.kernels) == 0


def test_strategies_order_kernels_differently(lowered):
    firsts = {}
    for strategy in ["sequential", "round_robin", "breadth_first"]:
        schedule, _ = extract_schedule(schedule_module(lowered, strategy, 1))
        firsts[strategy] = [k.tenant for k in schedule.kernels[:6]]
    assert len(set(firsts["sequential"])) == 1
    assert len(set(firsts["round_robin"][:3])) == 3
    assert firsts["breadth_first"] != firsts["sequential"]


def test_json_round_trip(lowered):
    schedule, _ = extract_schedule(schedule_module(lowered, "breadth_first", 2))
    again = Schedule.from_json(schedule.to_json())
    assert again == schedule


def _chain_schedule():
    """k0 (s0) -> k1 (s1) -> k2 (s0); k2 also reads k0."""
    from cosched.schedule import Buffer, Stream, TenantIO

    buffers = [Buffer(i, [4], "float32", "intermediate", "t") for i in range(4)]
    buffers[0].kind = "input"
    kernels = [
        Kernel(0, "f", "t", [0, 1], 1, stream=0, order=0),
        Kernel(1, "f", "t", [1, 2], 1, stream=1, order=0),
        Kernel(2, "f", "t", [1, 2, 3], 1, stream=0, order=1),
    ]
    assign_waits(kernels, {0: [], 1: [0], 2: [0, 1]}, 2)
    return Schedule(kernels, buffers, [TenantIO("t", {"x": 0}, [3])], [Stream(0), Stream(1)])


def test_assign_waits_is_minimal():
    schedule = _chain_schedule()
    assert schedule.kernels[1].waits == [0]
    assert schedule.kernels[2].waits == [1]  # k0 is earlier on the same stream: no wait
    schedule.validate()


def test_validate_rejects_missing_and_redundant_waits():
    schedule = _chain_schedule()
    schedule.kernels[2].waits = []
    with pytest.raises(CoschedError, match="may run before"):
        schedule.validate()
    schedule = _chain_schedule()
    schedule.kernels[2].waits = [0, 1]  # waiting on k0 is implied (same stream)
    with pytest.raises(CoschedError, match="redundant"):
        schedule.validate()


def test_explicit_order_is_checked(lowered):
    schedule, _ = extract_schedule(schedule_module(lowered, "sequential", 1))
    counts = {}
    for k in schedule.kernels:
        counts[k.tenant] = counts.get(k.tenant, 0) + 1
    order = [f"{t}:{i}" for t, n in counts.items() for i in range(n)]
    schedule_module(lowered, "explicit", 1, order=order)  # valid
    with pytest.raises(CoschedError, match="before the kernels it reads"):
        schedule_module(lowered, "explicit", 1, order=[order[1], order[0], *order[2:]])
    with pytest.raises(CoschedError, match="exactly once"):
        schedule_module(lowered, "explicit", 1, order=order[:-1])
    with pytest.raises(CoschedError, match="unknown tenant"):
        schedule_module(lowered, "explicit", 1, order=["nobody:0", *order[1:]])


def test_passes_compose_in_a_sequential(demo_tenants):
    from cosched.passes import AnnotateStreams, InterleaveOperators, LowerKernels, MergeTenants, stack_tenants

    seq = tvm.transform.Sequential(
        [MergeTenants(), LowerKernels(host_target()), InterleaveOperators("round_robin"), AnnotateStreams(2)]
    )
    mod = seq(stack_tenants(demo_tenants))
    main = mod["main"]
    assert len(main.params) == 3
    assert len(main.ret_ty.fields) == 3
    text = mod.script()
    # The schedule is visible to whoever prints the module: names carry stream and order ...
    assert "squeezenet_s0_0 = R.call_tir" in text
    assert "_s1_" in text
    # ... and the table on main lists tenant, stream, order and waits of every kernel.
    assert "cosched.schedule" in text and "waits=[" in text
    schedule, _ = extract_schedule(mod)
    assert {k.tenant for k in schedule.kernels} == {"squeezenet", "shufflenet", "inception_v1"}


def test_schedule_ir_versions(tiny_bundle):
    """Version 1 (one writer per buffer) still loads; an unknown version is refused, not misread."""
    from cosched.schedule import SCHEMA_VERSION

    data = tiny_bundle.schedule.to_dict()
    assert data["version"] == SCHEMA_VERSION == 2
    data["version"] = 1
    assert Schedule.from_dict(data).kernels == tiny_bundle.schedule.kernels
    data["version"] = 99
    with pytest.raises(CoschedError, match="version 99 is not supported"):
        Schedule.from_dict(data)
