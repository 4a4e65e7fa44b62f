"""Tree reduce with a bounded fan-in: any number of texts become one, and no single combine
call ever sees more than `fan_in` of them, so 1,000 node outputs never overflow a context.

Pure parts (`reduce_groups`, `reduce_levels`) do no I/O; `tree_reduce` only awaits the
caller's `combine`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from swarm.errors import UserError

Combine = Callable[[list[str], int, int], Awaitable[str]]


def _check_fan_in(fan_in: int) -> None:
    # A fan-in of 1 would never shrink a level: the reduce would not terminate.
    if fan_in < 2:
        raise UserError(f"merge fan-in must be at least 2, got {fan_in}")


def reduce_groups(n: int, fan_in: int) -> list[list[int]]:
    """Indices 0..n-1 in contiguous groups of at most `fan_in`, as few groups as possible.

    Sizes are balanced (they differ by at most one) rather than "full groups and a remainder",
    so a level never ends in a lonely group of one that a model call would only rephrase.
    """
    _check_fan_in(fan_in)
    if n < 0:
        raise UserError(f"cannot group a negative number of items ({n})")
    if n == 0:
        return []
    count = -(-n // fan_in)
    size, extra = divmod(n, count)
    groups: list[list[int]] = []
    start = 0
    for g in range(count):
        end = start + size + (1 if g < extra else 0)
        groups.append(list(range(start, end)))
        start = end
    return groups


def reduce_levels(n: int, fan_in: int) -> int:
    """How many levels `tree_reduce` runs for n items: ceil(log_fan_in(n)), in integers."""
    _check_fan_in(fan_in)
    levels, width = 0, 1
    while width < n:
        width *= fan_in
        levels += 1
    return levels


async def tree_reduce(
    items: list[str],
    fan_in: int,
    combine: Combine,
    *,
    limiter: anyio.CapacityLimiter | None = None,
) -> str:
    """Combine `items` level by level until one text remains.

    `combine(texts, level, index)` gets one group of a level; the groups of a level run
    concurrently (bounded by `limiter`), and results keep the input order whatever order the
    calls finish in. A group of one item is passed up unchanged: there is nothing to combine.
    An empty list reduces to "". If combine raises, the first error is re-raised as itself
    (not wrapped in an ExceptionGroup) so callers can catch ModelError & co. directly.
    """
    _check_fan_in(fan_in)
    texts = list(items)
    if not texts:
        return ""
    level = 0
    while len(texts) > 1:
        texts = await _reduce_level(texts, fan_in, combine, level, limiter)
        level += 1
    return texts[0]


async def _reduce_level(
    texts: list[str],
    fan_in: int,
    combine: Combine,
    level: int,
    limiter: anyio.CapacityLimiter | None,
) -> list[str]:
    groups = reduce_groups(len(texts), fan_in)
    out = [""] * len(groups)

    async def run_group(index: int, members: list[str]) -> None:
        if len(members) == 1:
            out[index] = members[0]
        elif limiter is None:
            out[index] = await combine(members, level, index)
        else:
            async with limiter:
                out[index] = await combine(members, level, index)

    try:
        async with anyio.create_task_group() as tg:
            for index, group in enumerate(groups):
                tg.start_soon(run_group, index, [texts[i] for i in group])
    except BaseExceptionGroup as group_error:
        _raise_first(group_error)
    return out


def _raise_first(group_error: BaseExceptionGroup[BaseException]) -> None:
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group_error]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    first = leaves[0] if leaves else group_error
    if isinstance(first, Exception):
        # Several groups may fail together (e.g. the endpoint is down); keep the rest as cause.
        raise first from (group_error if len(leaves) > 1 else None)
    raise group_error
