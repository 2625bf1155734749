"""DynamicBatcher and its flush policy (CPU only; timing bounds are generous for loaded boxes)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

import pytest

from batching import (
    BatcherClosed,
    BatcherStats,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFullError,
    RuntimePredictor,
)
from batching.errors import FaultySource, ResultCountError, WholeBatchError
from batching.policy import DEADLINE, FULL, MAX_DELAY, PRODUCERS, decide_flush

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_batcher():
    made: list[DynamicBatcher] = []

    def make(fn, **kw) -> DynamicBatcher:
        b = DynamicBatcher(fn, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close(timeout=5)


class Gate:
    """Blocks fn on its first call until opened, so the test can fill the queue meanwhile."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def wait_in_fn(self) -> None:
        self.started.set()
        assert self.release.wait(20), "gate never opened"

    async def until_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 20), "fn never started"


def double(xs):
    return [x * 2 for x in xs]


# --------------------------------------------------------------------------- results & batching


async def test_results_map_back_across_many_concurrent_submitters(make_batcher):
    seen_batches: list[int] = []

    def fn(items):
        seen_batches.append(len(items))
        time.sleep(0.002)  # let the queue build up while a batch runs
        return [(sid, i, x * x) for sid, i, x in items]

    b = make_batcher(fn, max_batch_size=32, max_queue_delay_ms=5)

    async def submitter(sid: int) -> None:
        for i in range(20):
            x = random.randint(0, 10_000)
            r = await b.submit((sid, i, x))
            assert r == (sid, i, x * x)
            await asyncio.sleep(random.random() * 0.002)

    await asyncio.gather(*(submitter(s) for s in range(50)))
    assert sum(seen_batches) == 50 * 20
    assert max(seen_batches) > 1, "no batch larger than 1 formed under concurrent load"
    snap = b.stats.snapshot()
    assert snap["completed"] == 1000 and snap["failed"] == 0


async def test_submitters_on_several_threads_and_loops(make_batcher):
    b = make_batcher(double, max_batch_size=16, max_queue_delay_ms=2)
    errors: list[BaseException] = []

    def thread_main(tid: int) -> None:
        async def run() -> None:
            futs = [b.submit(tid * 1000 + i) for i in range(100)]
            res = await asyncio.gather(*futs)
            assert res == [2 * (tid * 1000 + i) for i in range(100)]

        try:
            asyncio.run(run())
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert b.stats.snapshot()["completed"] == 400


async def test_full_batch_flushes_immediately(make_batcher):
    b = make_batcher(double, max_batch_size=8, max_queue_delay_ms=10_000)
    t0 = time.monotonic()
    res = await asyncio.gather(*(b.submit(i) for i in range(8)))
    assert res == [2 * i for i in range(8)]
    assert time.monotonic() - t0 < 3.0  # far below the 10 s max delay
    snap = b.stats.snapshot()
    assert snap["batch_size_hist"] == {8: 1}
    assert snap["flush_reasons"] == {FULL: 1}


async def test_max_queue_delay_flush(make_batcher):
    b = make_batcher(double, max_batch_size=64, max_queue_delay_ms=200)
    t0 = time.monotonic()
    assert await b.submit(21) == 42
    elapsed = time.monotonic() - t0
    assert 0.18 <= elapsed < 5.0
    assert b.stats.snapshot()["flush_reasons"] == {MAX_DELAY: 1}


async def test_deadline_flush_before_deadline_with_learned_run_time(make_batcher):
    run_s = 0.2
    starts: list[float] = []

    def fn(items):
        starts.append(time.monotonic())
        time.sleep(run_s)
        return items

    b = make_batcher(fn, max_batch_size=64, max_queue_delay_ms=10_000, safety_margin_ms=150)
    # Learn the run time: an already-due (non-droppable) item runs at once.
    await b.submit(0, deadline=time.monotonic())
    assert b.predictor.predict(1) >= run_s * 0.9

    t0 = time.monotonic()
    deadline = t0 + 1.0
    assert await b.submit(1, deadline=deadline) == 1
    done = time.monotonic()
    # It waited for company (did not run at once) but started in time to finish before the deadline.
    assert starts[1] >= t0 + 0.4, "flushed long before the deadline required"
    assert starts[1] <= deadline - run_s, "started too late to meet the deadline"
    assert done < deadline + 0.1  # expected ~150 ms early (the margin); slack for a loaded box
    assert b.stats.snapshot()["flush_reasons"][DEADLINE] == 2


async def test_producers_rule_flushes_without_waiting_max_delay(make_batcher):
    b = make_batcher(double, max_batch_size=64, max_queue_delay_ms=2000)
    for _ in range(4):
        b.add_producer()
    t0 = time.monotonic()
    res = await asyncio.gather(*(b.submit(i) for i in range(4)))
    assert res == [0, 2, 4, 6]
    assert time.monotonic() - t0 < 1.5
    snap = b.stats.snapshot()
    assert snap["batch_size_hist"] == {4: 1}
    assert snap["flush_reasons"] == {PRODUCERS: 1}


async def test_remove_producer_releases_waiting_items(make_batcher):
    b = make_batcher(double, max_batch_size=64, max_queue_delay_ms=5000)
    for _ in range(3):
        b.add_producer()
    t0 = time.monotonic()
    futs = [b.submit(i) for i in range(2)]
    await asyncio.sleep(0.05)
    assert not any(f.done() for f in futs)
    b.remove_producer()  # now 2 producers, 2 waiting: nothing more can come
    assert await asyncio.gather(*futs) == [0, 2]
    assert time.monotonic() - t0 < 3.0
    with pytest.raises(ValueError):
        for _ in range(3):
            b.remove_producer()


async def test_group_key_never_mixes_groups(make_batcher):
    batches: list[list[tuple[str, int]]] = []

    def fn(items):
        batches.append(list(items))
        return [(k, i * 10) for k, i in items]

    b = make_batcher(fn, max_batch_size=4, max_queue_delay_ms=20, group_key=lambda it: it[0])
    items = [(k, i) for i in range(10) for k in ("a", "b", "c")]
    res = await asyncio.gather(*(b.submit(it) for it in items))
    assert res == [(k, i * 10) for k, i in items]
    for batch in batches:
        assert len({k for k, _ in batch}) == 1, f"mixed batch {batch}"
        # FIFO within a group
        idx = [i for _, i in batch]
        assert idx == sorted(idx)
    assert max(len(bt) for bt in batches) == 4


async def test_oldest_group_first_and_full_younger_group_not_held(make_batcher):
    order: list[str] = []

    def fn(items):
        order.append(items[0][0])
        return items

    b = make_batcher(fn, max_batch_size=3, max_queue_delay_ms=1500, group_key=lambda it: it[0])
    fa = b.submit(("a", 0))
    fb = [b.submit(("b", i)) for i in range(3)]  # a full batch of a younger group
    await asyncio.gather(*fb)
    assert not fa.done()  # "b" ran without waiting for "a"'s 1.5 s max delay
    await fa
    assert order == ["b", "a"]


# --------------------------------------------------------------------------- back-pressure & drops


async def test_unhashable_group_key_fails_in_submit(make_batcher):
    b = make_batcher(double, group_key=lambda it: [it])
    with pytest.raises(TypeError):
        b.submit(1)
    assert b.stats.snapshot()["submitted"] == 0


async def test_queue_full_raises(make_batcher):
    gate = Gate()

    def fn(items):
        gate.wait_in_fn()
        return items

    b = make_batcher(fn, name="tiny", max_batch_size=1, max_queue_delay_ms=0, max_queue_size=4)
    first = b.submit(-1)
    await gate.until_started()
    try:
        queued = [b.submit(i) for i in range(4)]
        with pytest.raises(QueueFullError, match=r"tiny.*4"):
            b.submit(99)
        assert b.stats.snapshot()["rejected_full"] == 1
        assert b.stats.snapshot()["queue_depth"] == 4
    finally:
        gate.release.set()
    assert await first == -1
    assert await asyncio.gather(*queued) == [0, 1, 2, 3]


async def test_cancelled_futures_are_dropped_before_fn(make_batcher):
    gate = Gate()
    seen: list[int] = []

    def fn(items):
        if items == [-1]:
            gate.wait_in_fn()
        seen.extend(items)
        return items

    b = make_batcher(fn, max_batch_size=64, max_queue_delay_ms=0)
    first = b.submit(-1)
    await gate.until_started()
    futs = [b.submit(i) for i in range(6)]
    futs[2].cancel()
    futs[4].cancel()
    gate.release.set()
    assert await first == -1
    for i in (0, 1, 3, 5):
        assert await futs[i] == i
    assert 2 not in seen and 4 not in seen
    assert b.stats.snapshot()["dropped_cancelled"] == 2


async def test_cancelled_items_free_queue_space(make_batcher):
    gate = Gate()

    def fn(items):
        if items == [-1]:
            gate.wait_in_fn()
        return items

    b = make_batcher(fn, max_batch_size=64, max_queue_delay_ms=0, max_queue_size=2)
    first = b.submit(-1)
    await gate.until_started()
    try:
        a, c = b.submit(1), b.submit(2)
        a.cancel()
        d = b.submit(3)  # room made by purging the cancelled item, not QueueFullError
    finally:
        gate.release.set()
    assert await first == -1
    assert await asyncio.gather(c, d) == [2, 3]


async def test_drop_if_late_drops_only_droppable_items(make_batcher):
    gate = Gate()
    seen: list[str] = []

    def fn(items):
        if items == ["first"]:
            gate.wait_in_fn()
        seen.extend(items)
        return items

    b = make_batcher(fn, max_batch_size=64, max_queue_delay_ms=0)
    first = b.submit("first")
    await gate.until_started()
    deadline = time.monotonic() + 0.05
    video = b.submit("video", deadline=deadline, drop_if_late=True)
    audio = b.submit("audio", deadline=deadline)  # never dropped for lateness
    await asyncio.sleep(0.15)  # both deadlines pass while fn is blocked
    gate.release.set()
    assert await first == "first"
    with pytest.raises(DeadlineExceeded):
        await video
    assert await audio == "audio"
    assert "video" not in seen
    # Already late on arrival: refused at once, never queued.
    with pytest.raises(DeadlineExceeded):
        await b.submit("stale", deadline=time.monotonic() - 1, drop_if_late=True)
    snap = b.stats.snapshot()
    assert snap["dropped_late"] == 2 and snap["completed"] == 2


# --------------------------------------------------------------------------- failure isolation


async def test_bisection_isolates_poisoned_item_and_advances_each_stream_once(make_batcher):
    advances: Counter[int] = Counter()
    calls: list[int] = []
    poisoned = 13

    def fn(items):
        calls.append(len(items))
        outs = []
        for key in items:  # compute everything first...
            if key == poisoned:
                raise ValueError(f"bad input from stream {key}")
            outs.append(key + 1000)
        for key in items:  # ...stateful write-back last, only when the whole batch succeeded
            advances[key] += 1
        return outs

    b = make_batcher(fn, max_batch_size=32, max_queue_delay_ms=10_000)
    futs = [b.submit(k) for k in range(32)]
    results = await asyncio.gather(*futs, return_exceptions=True)
    for k, r in enumerate(results):
        if k == poisoned:
            assert isinstance(r, ValueError) and "stream 13" in str(r)
        else:
            assert r == k + 1000
    assert all(advances[k] == 1 for k in range(32) if k != poisoned), advances
    assert advances[poisoned] == 0
    assert calls[0] == 32 and len(calls) <= 1 + 2 * 5  # log2(32) levels, two calls each
    snap = b.stats.snapshot()
    assert snap["completed"] == 31 and snap["failed"] == 1 and snap["batches"] == 1
    assert snap["bisect_calls"] == len(calls) - 1


async def test_bisection_with_two_poisoned_items(make_batcher):
    def fn(items):
        if any(x in (3, 17) for x in items):
            raise RuntimeError("boom")
        return double(items)

    b = make_batcher(fn, max_batch_size=20, max_queue_delay_ms=10_000)
    results = await asyncio.gather(*(b.submit(i) for i in range(20)), return_exceptions=True)
    for i, r in enumerate(results):
        if i in (3, 17):
            assert isinstance(r, RuntimeError)
        else:
            assert r == 2 * i


async def test_whole_batch_error_is_not_bisected(make_batcher):
    calls: list[int] = []

    class WorkerDied(WholeBatchError, RuntimeError):
        pass

    def fn(items):
        calls.append(len(items))
        if len(calls) == 1:
            raise WorkerDied("the worker process died")
        return double(items)

    b = make_batcher(fn, max_batch_size=8, max_queue_delay_ms=10_000)
    results = await asyncio.gather(*(b.submit(i) for i in range(8)), return_exceptions=True)
    assert all(isinstance(r, WorkerDied) for r in results), results
    assert calls == [8]  # one call, no halves retried
    assert b.stats.snapshot()["failed"] == 8
    # the worker goes on with the next batch
    assert await b.submit(5) == 10


class _Died(WholeBatchError, RuntimeError):
    isolate = True  # like WorkerCrashed / WorkerTimeout: which item caused it is unknown


async def test_a_whole_batch_failure_is_retried_alone_and_the_faulty_source_refused(make_batcher):
    calls: list[list[str]] = []

    def fn(items):
        calls.append(list(items))
        if "poison" in items:
            raise _Died("the worker process died")
        return [x.upper() for x in items]

    b = make_batcher(fn, max_batch_size=8, max_queue_delay_ms=300)
    b.add_producer()
    b.add_producer()
    b.add_producer()
    t0 = time.monotonic()
    results = await asyncio.gather(
        b.submit("a", source="A"), b.submit("poison", source="P"), b.submit("c", source="C"),
        return_exceptions=True,
    )
    assert time.monotonic() - t0 < 5  # items run alone at once, never waiting for company
    assert results[0] == "A" and results[2] == "C", results  # bystanders: retried alone, fine
    assert isinstance(results[1], FaultySource) and results[1].source == "P", results
    assert isinstance(results[1].__cause__, _Died)
    assert calls[0] == ["a", "poison", "c"] and sorted(map(tuple, calls[1:])) == [("a",), ("c",), ("poison",)]
    snap = b.stats.snapshot()
    assert snap["isolated"] == 3 and snap["failed"] == 1 and snap["completed"] == 2
    assert b.faulty == 1 and b.suspects == 0  # A and C cleared by running fine alone
    with pytest.raises(FaultySource):
        b.submit("again", source="P")
    assert await b.submit("b", source="A") == "B"
    b.forget_source("P")  # the session ended: a new one may use the name
    assert b.faulty == 0
    assert await b.submit("fine", source="P") == "FINE"


async def test_a_one_off_whole_batch_failure_costs_nobody_an_error(make_batcher):
    failed_once = []

    def fn(items):
        if not failed_once:
            failed_once.append(True)
            raise _Died("killed once")
        return [x * 2 for x in items]

    b = make_batcher(fn, max_batch_size=4, max_queue_delay_ms=10_000)
    for _ in range(4):
        b.add_producer()
    results = await asyncio.gather(*(b.submit(i, source=i) for i in range(4)))
    assert results == [0, 2, 4, 6] and b.faulty == 0 and b.suspects == 0


async def test_items_without_a_source_still_fail_as_a_whole(make_batcher):
    def fn(items):
        raise _Died("died")

    b = make_batcher(fn, max_batch_size=2, max_queue_delay_ms=10_000)
    results = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)  # full: runs
    assert all(isinstance(r, _Died) for r in results)


async def test_wrong_result_count_is_an_error(make_batcher):
    calls: list[int] = []

    def fn(items):
        calls.append(len(items))
        return items[:-1]

    b = make_batcher(fn, name="short", max_batch_size=3, max_queue_delay_ms=10_000)
    results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    for r in results:
        assert isinstance(r, ResultCountError)
        assert "returned 2" in str(r) and "batch of 3" in str(r) and "short" in str(r)
    assert calls == [3]  # not retried: fn's side effects already happened
    assert b.stats.snapshot()["failed"] == 3


async def test_worker_survives_failures(make_batcher):
    def fn(items):
        if items[0] == "bad":
            raise ValueError("bad")
        return items

    b = make_batcher(fn, max_batch_size=1, max_queue_delay_ms=0)
    with pytest.raises(ValueError):
        await b.submit("bad")
    assert await b.submit("good") == "good"


# --------------------------------------------------------------------------- lifecycle, stats, loop


async def test_result_for_a_closed_loop_is_discarded_and_worker_survives(make_batcher):
    gate = Gate()

    def fn(items):
        if items == ["orphan"]:
            gate.wait_in_fn()
        return items

    b = make_batcher(fn, max_batch_size=1, max_queue_delay_ms=0)

    async def submit_and_leave():
        b.submit("orphan")  # the submitter's loop closes before the result exists

    await asyncio.to_thread(asyncio.run, submit_and_leave())
    await gate.until_started()
    gate.release.set()
    assert await b.submit("next") == "next"
    assert b._thread.is_alive()


async def test_fn_runs_on_the_batcher_worker_thread(make_batcher):
    where: list[str] = []

    def fn(items):
        where.append(threading.current_thread().name)
        return items

    b = make_batcher(fn, name="vad", max_batch_size=1)
    await b.submit(1)
    await b.submit(2)
    assert where == ["batcher-vad", "batcher-vad"]


async def test_initializer_runs_once_on_the_worker_thread_before_the_first_batch(make_batcher):
    calls: list[tuple[str, str]] = []
    local = threading.local()

    def init():
        local.ready = True
        calls.append(("init", threading.current_thread().name))

    def fn(items):
        assert getattr(local, "ready", False), "fn ran before the initializer on this thread"
        calls.append(("fn", threading.current_thread().name))
        return items

    b = make_batcher(fn, name="init", max_batch_size=1, initializer=init)
    assert calls == []  # nothing runs before the first submit starts the worker
    assert await b.submit(1) == 1
    assert await b.submit(2) == 2
    assert calls == [("init", "batcher-init"), ("fn", "batcher-init"), ("fn", "batcher-init")]


async def test_failing_initializer_fails_waiting_items_and_closes(make_batcher):
    def init():
        raise RuntimeError("no threads for you")

    b = make_batcher(lambda items: items, name="badinit", initializer=init)
    with pytest.raises(RuntimeError, match="no threads for you"):
        await asyncio.wait_for(b.submit(1), 10)
    assert b.closed
    with pytest.raises(BatcherClosed):
        b.submit(2)


async def test_close_fails_pending_and_rejects_new(make_batcher):
    gate = Gate()

    def fn(items):
        if items == [-1]:
            gate.wait_in_fn()
        return items

    b = make_batcher(fn, max_batch_size=64, max_queue_delay_ms=0)
    running = b.submit(-1)
    await gate.until_started()
    pending = [b.submit(i) for i in range(5)]
    closing = asyncio.get_running_loop().run_in_executor(None, b.close)
    for f in pending:
        with pytest.raises(BatcherClosed):
            await f
    gate.release.set()
    await closing
    assert await running == -1  # the batch that was already running still delivers
    assert not b._thread.is_alive()
    with pytest.raises(BatcherClosed):
        b.submit(1)
    b.close()  # idempotent
    assert b.stats.snapshot()["dropped_closed"] == 5


async def test_submit_outside_loop_is_an_error():
    b = DynamicBatcher(double)
    with pytest.raises(RuntimeError, match="asyncio loop"):
        await asyncio.to_thread(b.submit, 1)
    b.close()


async def test_stats_snapshot_is_consistent(make_batcher):
    def fn(items):
        if 7 in items:
            raise ValueError("seven")
        time.sleep(0.001)
        return items

    b = make_batcher(fn, max_batch_size=8, max_queue_delay_ms=3)

    async def one(i: int):
        await asyncio.sleep(random.random() * 0.02)
        return await b.submit(i)

    tasks = [asyncio.ensure_future(one(i)) for i in range(200)]
    tasks[50].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    late = b.submit(999, deadline=time.monotonic() - 1, drop_if_late=True)
    with pytest.raises(DeadlineExceeded):
        await late

    s = b.stats.snapshot()
    hist = s["batch_size_hist"]
    assert sum(hist.values()) == s["batches"]
    assert sum(k * v for k, v in hist.items()) == s["completed"] + s["failed"]
    assert s["failed"] == 1
    terminal = s["completed"] + s["failed"] + s["dropped_cancelled"] + s["dropped_late"] + s["dropped_closed"]
    assert terminal == s["submitted"]
    assert s["queue_depth"] == 0
    assert sum(s["flush_reasons"].values()) == s["batches"]
    for key in ("queue_wait_ms", "run_ms"):
        p = s[key]
        assert 0 <= p["p50"] <= p["p95"] <= p["p99"]
    assert s["mean_batch_size"] == pytest.approx(
        sum(k * v for k, v in hist.items()) / s["batches"]
    )


def test_stats_percentiles_empty_and_window():
    st = BatcherStats("x", window=4)
    snap = st.snapshot()
    assert snap["run_ms"] == {"p50": None, "p95": None, "p99": None}
    for v in (1.0, 1.0, 1.0, 1.0, 0.002, 0.002, 0.002, 0.002):
        st.record_run(v)
    assert st.snapshot()["run_ms"]["p99"] == pytest.approx(2.0)  # old samples left the window


async def test_event_loop_not_blocked_while_fn_runs(make_batcher):
    def fn(items):
        time.sleep(0.3)
        return items

    b = make_batcher(fn, max_batch_size=1, max_queue_delay_ms=0)
    ticks = 0
    stop = False

    async def ticker():
        nonlocal ticks
        while not stop:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    assert await b.submit("x") == "x"
    stop = True
    await t
    assert ticks >= 5, f"loop ticked only {ticks} times during a 300 ms fn"


async def test_batches_run_strictly_one_after_another(make_batcher):
    active = 0
    overlap = False
    lock = threading.Lock()

    def fn(items):
        nonlocal active, overlap
        with lock:
            active += 1
            overlap |= active > 1
        time.sleep(0.002)
        with lock:
            active -= 1
        return items

    b = make_batcher(fn, max_batch_size=4, max_queue_delay_ms=1)
    await asyncio.gather(*(b.submit(i) for i in range(100)))
    assert not overlap


# --------------------------------------------------------------------------- policy (pure)


def _decide(**kw):
    base = dict(
        now=100.0,
        batch_size=3,
        max_batch_size=8,
        oldest_enqueued_at=100.0,
        earliest_deadline=None,
        predicted_run_s=0.010,
        safety_margin_s=0.002,
        max_queue_delay_s=0.050,
        producers=0,
        queued=3,
    )
    base.update(kw)
    return decide_flush(**base)


def test_policy_full():
    d = _decide(batch_size=8)
    assert d.flush and d.reason == FULL


def test_policy_waits_until_earliest_trigger():
    d = _decide(earliest_deadline=100.040)
    assert not d.flush
    assert d.wake_at == pytest.approx(100.040 - 0.010 - 0.002)
    d = _decide(earliest_deadline=None)
    assert not d.flush and d.wake_at == pytest.approx(100.050)
    d = _decide(earliest_deadline=101.0)  # deadline far away: max delay comes first
    assert d.wake_at == pytest.approx(100.050)


def test_policy_deadline_trigger():
    # now + run + margin == deadline -> flush
    d = _decide(now=100.028, earliest_deadline=100.040)
    assert d.flush and d.reason == DEADLINE
    d = _decide(now=100.027, earliest_deadline=100.040)
    assert not d.flush
    # a longer predicted run moves the flush earlier
    d = _decide(now=100.010, earliest_deadline=100.040, predicted_run_s=0.030)
    assert d.flush and d.reason == DEADLINE
    # already past the deadline -> flush at once
    assert _decide(earliest_deadline=99.0).flush


def test_policy_max_delay_trigger():
    d = _decide(now=100.050)
    assert d.flush and d.reason == MAX_DELAY
    assert not _decide(now=100.049).flush


def test_policy_producers_trigger():
    d = _decide(producers=3, queued=3)
    assert d.flush and d.reason == PRODUCERS
    assert not _decide(producers=4, queued=3).flush
    assert not _decide(producers=0, queued=3).flush  # no producers registered: rule is off


def test_policy_empty_candidate():
    assert not _decide(batch_size=0).flush


def test_predictor_prior_and_ewma():
    p = RuntimePredictor(alpha=0.5, prior_s=0.001)
    assert p.predict(1) == 0.001 and p.predict(64) == 0.001
    p.observe(4, 0.010)
    assert p.predict(4) == pytest.approx(0.010)
    assert p.predict(3) == pytest.approx(0.010)  # same bucket (3..4)
    p.observe(4, 0.020)
    assert p.predict(4) == pytest.approx(0.015)
    for _ in range(50):
        p.observe(4, 0.030)
    assert p.predict(4) == pytest.approx(0.030, rel=1e-6)


def test_predictor_buckets():
    assert [RuntimePredictor.bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [
        1, 2, 4, 4, 8, 8, 16, 64, 128,
    ]


def test_predictor_interpolates_and_extrapolates():
    p = RuntimePredictor(alpha=1.0)
    p.observe(1, 0.001)
    assert p.predict(32) == pytest.approx(0.001)  # one point: flat
    p.observe(16, 0.016)
    assert p.predict(4) == pytest.approx(0.004)  # linear between (1, 1 ms) and (16, 16 ms)
    assert p.predict(32) == pytest.approx(0.032)  # extrapolated along the last two points
    p2 = RuntimePredictor(alpha=1.0)
    p2.observe(8, 0.010)
    p2.observe(16, 0.005)  # noisy: bigger batch measured faster
    assert p2.predict(64) == pytest.approx(0.005)  # slope clamped at 0, never decreasing
    assert p2.predict(1) >= 0.0
    assert p2.snapshot() == {8: 0.010, 16: 0.005}


def test_predictor_ignores_bad_samples():
    p = RuntimePredictor(prior_s=0.002)
    p.observe(0, 1.0)
    p.observe(4, float("nan"))
    p.observe(4, -1.0)
    assert p.predict(4) == 0.002
