"""The memory plan shares storage only where the schedule orders the users, also across streams."""

import pytest

from cosched.compiler import lower_tenants, schedule_module
from cosched.extract import extract_schedule
from cosched.runtime.memory import plan_memory
from cosched.target import host_target


@pytest.fixture(scope="module")
def lowered(demo_tenants):
    return lower_tenants(demo_tenants, host_target())


@pytest.mark.parametrize(("num_streams", "policy"), [(1, "auto"), (2, "auto"), (3, "round_robin"), (4, "balanced")])
def test_storage_is_shared_only_along_happens_before(lowered, num_streams, policy):
    schedule, _ = extract_schedule(schedule_module(lowered, "breadth_first", num_streams, policy))
    plan = plan_memory(schedule)
    by_id = {k.id: k for k in schedule.kernels}
    clocks = schedule.clocks()
    position = {k.id: i for i, k in enumerate(schedule.kernels)}
    users, producer = {}, {}
    for k in schedule.kernels:
        for b in k.args:
            users.setdefault(b, []).append(k.id)
        for b in k.outputs:
            producer[b] = k.id
    buffers = {b.id: b for b in schedule.buffers}
    by_block = {}
    for b, block in plan.buffer_storage.items():
        by_block.setdefault(block, []).append(b)
        assert buffers[b].nbytes <= plan.storage_bytes[block]
    shared = 0
    for members in by_block.values():
        members.sort(key=lambda b: position[producer[b]])
        for i, later in enumerate(members):
            for earlier in members[:i]:
                shared += 1
                writer = producer[later]
                for u in users[earlier]:
                    assert u != writer
                    assert clocks[writer][by_id[u].stream] >= by_id[u].order, (earlier, later)
    assert shared > 0  # the plan does reuse memory
    assert plan.planned_bytes < sum(b.nbytes for b in schedule.buffers if b.kind == "intermediate")


def test_outputs_and_inputs_are_not_planned(demo_bundle):
    kinds = {b.id: b.kind for b in demo_bundle.schedule.buffers}
    assert all(kinds[b] == "intermediate" for b in demo_bundle.memory.buffer_storage)
    assert demo_bundle.planned_bytes > 0
