"""A memory plan that is safe under concurrency: storage is shared only along happens-before edges."""

from __future__ import annotations

from dataclasses import dataclass

from cosched.schedule import Schedule

ALIGN = 64


@dataclass
class MemoryPlan:
    """Storage blocks (bytes) and the block each planned buffer lives in."""

    storage_bytes: list[int]
    buffer_storage: dict[int, int]

    @property
    def planned_bytes(self) -> int:
        return sum(self.storage_bytes)


def plan_memory(schedule: Schedule) -> MemoryPlan:
    """Share storage between intermediates only when reuse is safe under the schedule's concurrency.

    A buffer may take over a block when every kernel that touched the block's previous tenants happens
    before the kernel that writes it: on the same stream earlier, or ordered by waits. Inputs, params
    and outputs get their own memory.
    """
    by_id = {k.id: k for k in schedule.kernels}
    buffers = {b.id: b for b in schedule.buffers}
    start = schedule.clocks()
    users: dict[int, list[int]] = {}
    for k in schedule.kernels:
        for b in k.args:
            users.setdefault(b, []).append(k.id)

    def happens_before(a: int, b: int) -> bool:
        return a == b or start[b][by_id[a].stream] >= by_id[a].order

    blocks: list[int] = []
    block_users: list[list[int]] = []  # every kernel that used any buffer placed in the block
    placement: dict[int, int] = {}
    for k in schedule.kernels:  # issue order
        for b in k.outputs:
            if buffers[b].kind != "intermediate" or b in placement:
                continue
            size = buffers[b].nbytes
            free = [i for i, past in enumerate(block_users) if all(happens_before(u, k.id) and u != k.id for u in past)]
            # Best fit: the smallest free block that is large enough, else the largest one, grown.
            fitting = [i for i in free if blocks[i] >= size]
            if fitting:
                choice = min(fitting, key=lambda i: blocks[i])
            elif free:
                choice = max(free, key=lambda i: blocks[i])
                blocks[choice] = size
            else:
                blocks.append(size)
                block_users.append([])
                choice = len(blocks) - 1
            placement[b] = choice
            block_users[choice].extend(users.get(b, []))
    return MemoryPlan(storage_bytes=[_round_up(s) for s in blocks], buffer_storage=placement)


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
