"""HandlerPool: a stuck call costs a thread of capacity, never the progress of other calls."""

from __future__ import annotations

import threading
import time

from server.handler_pool import HandlerPool


def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_stuck_call_is_replaced_and_counted_back_when_it_returns():
    pool = HandlerPool(max_workers=2, max_lost=3)
    release = threading.Event()
    stuck = [pool.submit(release.wait, 30) for _ in range(2)]  # both workers busy
    wait_until(lambda: pool.busy == 2)
    late = pool.submit(lambda: "late")
    time.sleep(0.2)
    assert not late.done()  # queued behind the two stuck calls: a plain pool would hang here
    for f in stuck:
        pool.abandon(f)
    assert late.result(timeout=5) == "late"  # replacement threads served it
    assert pool.lost == 2 and not pool.exhausted
    assert [pool.submit(lambda i=i: i * i).result(timeout=5) for i in range(5)] == [0, 1, 4, 9, 16]
    release.set()
    wait_until(lambda: pool.lost == 0)
    assert all(f.result(timeout=5) for f in stuck)  # the stuck calls finished after all
    wait_until(lambda: pool.threads <= 2)  # the extra threads retired


def test_abandoning_a_queued_call_means_it_never_runs():
    pool = HandlerPool(max_workers=1, max_lost=1)
    gate = threading.Event()
    ran = []
    first = pool.submit(gate.wait, 5)
    queued = pool.submit(ran.append, 1)
    pool.abandon(queued)
    gate.set()
    first.result(timeout=5)
    pool.submit(lambda: None).result(timeout=5)
    assert queued.cancelled() and ran == [] and pool.lost == 0


def test_exhausted_once_too_many_threads_are_lost():
    pool = HandlerPool(max_workers=1, max_lost=2)
    release = threading.Event()
    futures = []
    for _ in range(2):
        f = pool.submit(release.wait, 30)
        wait_until(lambda: pool.busy == 1)
        pool.abandon(f)
        futures.append(f)
    assert pool.lost == 2 and pool.exhausted
    assert pool.submit(lambda: 7).result(timeout=5) == 7  # running sessions' calls still run
    release.set()
    wait_until(lambda: not pool.exhausted)


def test_exceptions_reach_the_caller():
    pool = HandlerPool(max_workers=1, max_lost=1)
    f = pool.submit(lambda: 1 / 0)
    try:
        f.result(timeout=5)
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("no exception")


def test_idle_threads_exit(monkeypatch):
    import server.handler_pool as hp

    monkeypatch.setattr(hp, "IDLE_EXIT_S", 0.2)
    pool = HandlerPool(max_workers=4, max_lost=1)
    gate = threading.Event()
    burst = [pool.submit(gate.wait, 5) for _ in range(4)]
    wait_until(lambda: pool.threads == 4)
    gate.set()
    assert all(f.result(timeout=5) for f in burst)
    wait_until(lambda: pool.threads == 0)  # the burst's threads went away
    assert pool.submit(lambda: 3).result(timeout=5) == 3  # and come back on demand
