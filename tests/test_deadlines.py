"""The per-loop call watcher behind `Session.call_limited` (server/deadlines.py)."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from server.deadlines import call_deadlines

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.uncancel is 3.11+")


async def _watched(timeout: float, work: float) -> str:
    deadlines = call_deadlines(asyncio.get_running_loop())
    token = deadlines.start(timeout)
    try:
        await asyncio.sleep(work)
        return "done"
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if deadlines.finish(token) and task is not None and task.uncancel() == 0:
            return "timed out"
        raise
    finally:
        deadlines.finish(token)


async def test_an_overrunning_call_is_cancelled_soon_after_its_timeout() -> None:
    t0 = time.monotonic()
    assert await _watched(0.2, 10) == "timed out"
    took = time.monotonic() - t0
    assert 0.2 <= took < 0.2 + 0.05 + 0.1, took  # at most a quarter of the timeout late


async def test_calls_within_their_timeout_finish_and_leave_nothing_behind() -> None:
    results = await asyncio.gather(*[_watched(1.0, 0.01) for _ in range(500)])
    assert results == ["done"] * 500
    watcher = call_deadlines(asyncio.get_running_loop())
    assert len(watcher) == 0
    await asyncio.sleep(0.3)  # the periodic check stops once nothing is watched
    assert watcher._check_handle is None


async def test_only_the_late_call_of_many_times_out() -> None:
    results = await asyncio.gather(_watched(0.3, 5), *[_watched(0.3, 0.05) for _ in range(20)])
    assert results == ["timed out"] + ["done"] * 20


async def test_someone_elses_cancel_is_not_taken_for_a_timeout() -> None:
    task = asyncio.ensure_future(_watched(5.0, 10))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(call_deadlines(asyncio.get_running_loop())) == 0
