"""batching.process.ProcessRunner: a batch function in a child process, arrays via shared memory.

The helpers are module-level so that they pickle by reference: the spawned child imports this
module (`tests.test_process_runner`) to run them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from batching.errors import BatchingError
from batching.process import SHM_PREFIX, ProcessRunner, RunnerClosed, WorkerCrashed, WorkerTimeout

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="checks /dev/shm (Linux)")


class Tag:
    """A custom class in the results: must come back as itself (pickled normally)."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is Tag and other.value == self.value


class TwoArgError(Exception):
    """Cannot be rebuilt from its args: the child must send a RuntimeError instead."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")


def process(batch: np.ndarray, meta: dict) -> list:
    """Per item: (frame + 1 as a view into one big array, a dict with a small array, a Tag)."""
    out = (batch.astype(np.int16) + 1).clip(max=255).astype(np.uint8)
    return [
        (out[i], {"sum": int(batch[i].sum()), "row": batch[i, 0, :, 0].astype(np.float32), "pid": os.getpid()},
         Tag(meta["tag"]))
        for i in range(batch.shape[0])
    ]


_KEPT: list[np.ndarray] = []


def misbehave(batch: np.ndarray, meta: object) -> list:
    """Does what `meta` says: ("raise", msg) / ("raise2",) / ("exit", code) / ("sleep", s) /
    ("lock",): an unpicklable result / ("keep",): keep the batch view / anything else: echo."""
    if isinstance(meta, tuple) and meta[0] == "raise":
        raise ValueError(meta[1])
    if isinstance(meta, tuple) and meta[0] == "raise2":
        raise TwoArgError(1, 2)
    if isinstance(meta, tuple) and meta[0] == "exit":
        os._exit(meta[1])
    if isinstance(meta, tuple) and meta[0] == "sleep":
        time.sleep(meta[1])
    if isinstance(meta, tuple) and meta[0] == "keep":
        _KEPT.append(batch)  # a view on the input block, still held when that block is replaced
    if isinstance(meta, tuple) and meta[0] == "lock":
        return [threading.Lock() for _ in range(batch.shape[0])]
    return [(batch[i].copy(), meta, os.getpid()) for i in range(batch.shape[0])]


def _fail_on_load() -> None:
    raise ImportError("no such model module: imaginary_model")


class FailsInChild:
    """Pickles fine here; unpickling it (in the child) raises, like a model module that won't import."""

    def __reduce__(self):
        return (_fail_on_load, ())


def with_extra(extra: object, batch: np.ndarray, meta: object) -> list:
    return [extra] * batch.shape[0]


def threads_info(batch: np.ndarray, meta: object) -> list:
    import torch  # only to see that child_threads was applied

    return [{"x": np.arange(3), "threads": torch.get_num_threads()}] * batch.shape[0]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def ours(runner: ProcessRunner) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(runner.shm_prefix)]


def frames(b: int, h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def check_processed(batch: np.ndarray, res: list, tag: object) -> None:
    assert isinstance(res, list) and len(res) == batch.shape[0]
    for i, (frame, info, t) in enumerate(res):
        assert isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape == batch.shape[1:]
        np.testing.assert_array_equal(frame, (batch[i].astype(np.int16) + 1).clip(max=255))
        assert info["sum"] == int(batch[i].sum())
        np.testing.assert_array_equal(info["row"], batch[i, 0, :, 0].astype(np.float32))
        assert info["row"].dtype == np.float32
        assert t == Tag(tag)


@pytest.fixture(scope="module")
def runner():
    r = ProcessRunner(process, name="test-process", initial_bytes=64 * 1024)
    r.start()
    yield r
    r.close()
    assert ours(r) == []


@pytest.fixture(scope="module")
def rough():
    """One runner for the misbehaving tests that keep their child (errors, not crashes)."""
    r = ProcessRunner(misbehave, name="test-rough")
    yield r
    r.close()


def test_round_trip_values_and_independent_copies(runner):
    batch = frames(4)
    res = runner(batch, {"tag": "a"})
    check_processed(batch, res, "a")
    assert res[0][1]["pid"] == runner.pid != os.getpid()
    block = np.frombuffer(runner._out.buf, np.uint8)
    for frame, info, _ in res:  # private memory (one copy per call), not views on the shared block
        assert frame.flags.writeable and not np.shares_memory(frame, block)
        assert not np.shares_memory(info["row"], block)
    del block
    kept = [r[0].copy() for r in res]
    res[0][0][...] = 7  # mutating a result must not touch the next call's results
    res2 = runner(frames(4, seed=1), {"tag": "b"})
    check_processed(frames(4, seed=1), res2, "b")
    for k, (f, _, _) in zip(kept[1:], res[1:]):  # and the next call must not change these
        np.testing.assert_array_equal(f, k)
    assert (res[0][0] == 7).all()


def test_non_contiguous_and_other_dtypes(runner):
    batch = frames(3, seed=2)[:, ::2, 1:]  # a strided view: copied in as C order
    assert not batch.flags.c_contiguous
    check_processed(np.ascontiguousarray(batch), runner(batch, {"tag": 1}), 1)


def test_input_buffer_zero_copy(runner):
    batch = frames(5, seed=3)
    buf = runner.input_buffer(batch.shape, np.uint8)
    assert buf.shape == batch.shape and buf.flags.writeable
    np.stack(list(batch), out=buf)
    res = runner(buf, {"tag": "z"})
    check_processed(batch, res, "z")
    # The same buffer again (reused between calls), refilled in place.
    buf2 = runner.input_buffer(batch.shape, np.uint8)
    assert buf2.__array_interface__["data"][0] == buf.__array_interface__["data"][0]
    buf2[...] = frames(5, seed=4)
    check_processed(frames(5, seed=4), runner(buf2, {"tag": "y"}), "y")


def test_growing_buffers(runner):
    small = frames(2, seed=5)
    check_processed(small, runner(small, {"tag": 0}), 0)
    before = set(ours(runner))
    big = frames(6, 120, 160, seed=6)  # 345 KB in and out, the blocks start at 64 KB
    assert big.nbytes > runner.initial_bytes
    check_processed(big, runner(big, {"tag": 1}), 1)
    after = set(ours(runner))
    assert len(after) == 2 and not (after & before)  # both replaced, the old ones unlinked
    # The grown input block also serves a zero-copy call of that size.
    buf = runner.input_buffer(big.shape, np.uint8)
    buf[...] = big[::-1]
    check_processed(big[::-1], runner(buf, {"tag": 2}), 2)
    check_processed(small, runner(small, {"tag": 3}), 3)  # and small ones still work


def test_fn_exception_comes_back_and_child_survives(rough):
    rough.start()
    pid = rough.pid
    with pytest.raises(ValueError, match="bad frame 3") as info:
        rough(frames(2), ("raise", "bad frame 3"))
    assert "misbehave" in str(info.value.__cause__)  # the child's traceback, as the cause
    with pytest.raises(RuntimeError, match=r"TwoArgError: 1\+2"):  # does not unpickle: a RuntimeError
        rough(frames(2), ("raise2",))
    res = rough(frames(2), "fine")
    assert res[0][1] == "fine" and res[0][2] == pid == rough.pid
    assert rough.restarts == 0


def test_unpicklable_meta_or_result_is_an_error_not_a_hang(rough):
    with pytest.raises(TypeError, match="pickle"):
        rough(frames(1), threading.Lock())  # meta fails to pickle in the parent
    with pytest.raises(TypeError, match="pickle"):
        rough(frames(1), ("lock",))  # the result fails to pickle in the child
    res = rough(frames(1), "ok")
    assert res[0][1] == "ok"


def test_odd_arrays_and_dtypes(rough):
    """misbehave echoes `meta`: its arrays come back through the output block."""
    rec = np.zeros(3, dtype=[("x", np.int32), ("y", np.float64)])
    rec["x"], rec["y"] = [1, 2, 3], [0.5, 1.5, 2.5]
    meta = {
        "empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5), "bool": np.array([True, False]),
        "transposed": np.arange(12, dtype=np.float64).reshape(3, 4).T, "record": rec,
        "objects": np.array([{"a": 1}, None], dtype=object),  # cannot go through shared memory: pickled
        "nested": [(np.arange(5, dtype=np.int64), "s")],
        "big": np.arange(600_000, dtype=np.int32),  # 2.4 MB: grows the 1 MB output block, not the input
    }
    for batch in (np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 3, 4), np.array([[True], [False]])):
        res = rough(batch, meta)
        assert len(res) == 2
        for i, (item, echoed, _) in enumerate(res):
            np.testing.assert_array_equal(item, batch[i])
            assert item.dtype == batch.dtype
            assert echoed.keys() == meta.keys()
            for k in ("empty", "scalar", "bool", "transposed", "record", "big"):
                assert echoed[k].dtype == meta[k].dtype and echoed[k].shape == meta[k].shape, k
                np.testing.assert_array_equal(echoed[k], meta[k])
            assert list(echoed["objects"]) == [{"a": 1}, None]
            np.testing.assert_array_equal(echoed["nested"][0][0], np.arange(5))
            assert echoed["nested"][0][1] == "s"
    assert rough.restarts == 0


def test_views_held_across_growth(rough):
    """Views still held on a replaced block (by fn in the child, by the caller here) stay valid."""
    kept = rough(frames(2, seed=7), ("keep",))  # the child keeps its view of this input block
    mine = rough.input_buffer((2, 24, 32, 3), np.uint8)  # and so do we
    mine[...] = frames(2, seed=8)
    big = frames(4, 300, 300, seed=9)  # 1.08 MB: both sides replace the 1 MB input block
    res = rough(big, "big")
    np.testing.assert_array_equal(np.stack([r[0] for r in res]), big)
    addr = rough.input_buffer((1,), np.uint8).__array_interface__["data"][0]
    assert addr != mine.__array_interface__["data"][0]  # the input block was replaced
    np.testing.assert_array_equal(mine, frames(2, seed=8))  # still readable, no longer shared
    res = rough(mine, "mine")  # not the current input block any more: copied in
    np.testing.assert_array_equal(np.stack([r[0] for r in res]), frames(2, seed=8))
    np.testing.assert_array_equal(kept[1][0], frames(2, seed=7)[1])
    assert rough.restarts == 0


def test_crash_raises_and_next_call_restarts():
    r = ProcessRunner(misbehave, name="test-crash")
    try:
        r.start()
        pid = r.pid
        with pytest.raises(WorkerCrashed, match="exit code 3"):
            r(frames(2), ("exit", 3))
        assert r.pid is None and gone(pid)
        assert ours(r) == []  # the dead child's blocks are gone too
        res = r(frames(2), "again")
        assert res[1][1] == "again" and res[1][2] == r.pid != pid
        assert r.restarts == 1
    finally:
        r.close()


def test_hang_times_out_and_is_killed():
    r = ProcessRunner(misbehave, name="test-hang", call_timeout_s=1.0)
    try:
        r.start()
        pid = r.pid
        t0 = time.monotonic()
        with pytest.raises(WorkerTimeout, match="timed out: call took longer than 1.0 s"):
            r(frames(2), ("sleep", 60))
        took = time.monotonic() - t0
        assert 0.9 < took < 8, took
        assert gone(pid)
        assert isinstance(WorkerTimeout("x"), TimeoutError) and issubclass(WorkerTimeout, BatchingError)
        res = r(frames(2), "after")
        assert res[0][1] == "after" and r.pid != pid and r.restarts == 1
    finally:
        r.close()


def test_unpicklable_fn_fails_at_once():
    t0 = time.monotonic()
    with pytest.raises(TypeError, match="picklable"):
        ProcessRunner(lambda b, m: [], name="lambda")
    assert time.monotonic() - t0 < 1


def test_fn_that_cannot_load_in_the_child_fails_at_start():
    r = ProcessRunner(functools.partial(with_extra, FailsInChild()), name="test-noload", start_timeout_s=60)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashed, match="(?s)failed to start.*ImportError: no such model module"):
            r.start()
        assert time.monotonic() - t0 < 30
        with pytest.raises(WorkerCrashed):  # and again on the next try, never a hang
            r(frames(1), None)
        assert ours(r) == []
    finally:
        r.close()


def test_close_stops_child_unlinks_and_refuses_calls():
    r = ProcessRunner(threads_info, name="test-close", child_threads=3)
    res = r(frames(2), None)
    np.testing.assert_array_equal(res[1]["x"], np.arange(3))
    assert res[0]["threads"] == 3
    pid = r.pid
    assert pid is not None and len(ours(r)) == 2
    r.close()
    assert gone(pid) and r.pid is None
    assert ours(r) == []
    with pytest.raises(RunnerClosed):
        r(frames(1), None)
    with pytest.raises(RunnerClosed):
        r.input_buffer((1, 2), np.uint8)
    r.close()  # idempotent


def test_close_during_a_call_fails_that_call_promptly():
    r = ProcessRunner(misbehave, name="test-close-busy", call_timeout_s=None)
    r.start()
    pid = r.pid
    errors: list[BaseException] = []

    def call() -> None:
        try:
            r(frames(1), ("sleep", 60))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    r.close()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 8
    assert len(errors) == 1 and isinstance(errors[0], (RunnerClosed, WorkerCrashed)), errors
    assert gone(pid) and ours(r) == []


def test_calls_from_threads_get_their_own_results(runner):
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def call(k: int) -> None:
        try:
            for j in range(5):
                b = frames(1 + k, seed=100 * k + j)
                res = runner(b, {"tag": (k, j)})
                check_processed(b, res, (k, j))
            results[k] = res
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]


_ORPHAN = """
import os, threading, time, numpy as np
from batching.process import ProcessRunner
from tests.test_process_runner import misbehave
if __name__ == "__main__":
    r = ProcessRunner(misbehave, name="orphan")
    r(np.zeros((2, 4, 4, 3), np.uint8), "x")  # creates the shared blocks too
    # Die while the child is busy in fn: it cannot see EOF on its pipe, its watchdog must act.
    threading.Thread(target=r, args=(np.zeros((1, 4, 4, 3), np.uint8), ("sleep", 120)), daemon=True).start()
    time.sleep(0.5)
    print(r.pid, r.shm_prefix, flush=True)
    os._exit(0)  # no close(), no atexit
"""


def test_child_exits_when_the_parent_dies(tmp_path):
    script = tmp_path / "orphan_parent.py"
    script.write_text(_ORPHAN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "stderr.txt", "w") as err:
        # Read one line, then wait for the exit: the child (and the resource tracker) inherit
        # stdout, so waiting for EOF would wait for them too.
        parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=err, text=True)
        line = parent.stdout.readline()
        assert parent.wait(60) == 0, (tmp_path / "stderr.txt").read_text()
    parent.stdout.close()
    pid_s, prefix = line.split()
    pid = int(pid_s)
    assert prefix.startswith(SHM_PREFIX)
    deadline = time.monotonic() + 10
    try:
        while not gone(pid):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    # The parent never unlinked its blocks: Python's resource tracker does, once both are gone.
    while any(n.startswith(prefix) for n in os.listdir("/dev/shm")):
        assert time.monotonic() < deadline, "shared memory left behind"
        time.sleep(0.05)


def test_batch_too_big_for_dev_shm_is_a_clear_error(monkeypatch):
    """tmpfs allocates lazily: an oversized block would SIGBUS the server on first write
    (Docker's /dev/shm is 64 MiB). It is refused with an error naming the fix instead."""
    import batching.process as bp

    r = ProcessRunner(process, name="test-shm", initial_bytes=64 * 1024)
    try:
        small = frames(1)
        check_processed(small, r(small, {"tag": "s"}), "s")
        real = bp.shutil.disk_usage
        monkeypatch.setattr(bp.shutil, "disk_usage", lambda p: real(p)._replace(free=100 * 1024))
        big = frames(16, 96, 128)  # 590 KB: needs bigger blocks than the 64 KiB ones
        with pytest.raises(MemoryError, match="shm-size"):
            r(big, {"tag": "b"})
        check_processed(small, r(small, {"tag": "s"}), "s")  # smaller batches still served
        monkeypatch.setattr(bp.shutil, "disk_usage", real)
        check_processed(big, r(big, {"tag": "b"}), "b")
    finally:
        r.close()
    assert ours(r) == []
