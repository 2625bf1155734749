"""Run a batch function in a child process; batches and result arrays travel through shared memory.

Why: inside the web server a model's many small torch calls each re-acquire the GIL while
aiortc's codec threads and the event loop hold it (convoy effect: a 23 ms batch took 76 ms).
A child process has its own GIL and CUDA context, and a child that hangs or crashes can be
killed and restarted instead of blocking every session.

Protocol on one Pipe (small messages; the arrays go through shared memory):
  parent -> child: ("call", in_name, shape, dtype, meta, out_name) | ("out", name) | None (stop)
  child -> parent: ("ready", pid) | ("fatal", tb) | ("need", nbytes) | ("ok", packed) | ("err", exc, tb)
The parent creates, grows and unlinks every block, so a child that dies leaks nothing. The
child only attaches; under "spawn" it shares the parent's resource_tracker, where its attach
registration is the same entry that the parent's single unlink removes (no leak warnings).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import pickle
import secrets
import shutil
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NamedTuple, NoReturn

import numpy as np

from .errors import BatcherClosed, WholeBatchError

logger = logging.getLogger(__name__)

SHM_PREFIX = "brtc_"  # every block is named f"{SHM_PREFIX}{parent pid}_{random}_{n}"
_ALIGN = 64


class WorkerCrashed(WholeBatchError, RuntimeError):
    """The worker process died (or failed to start); the next call starts a fresh one."""

    isolate = True


class WorkerTimeout(WholeBatchError, TimeoutError):
    """A call ran past `call_timeout_s`; the worker was killed and the next call starts a fresh one."""

    isolate = True


class RunnerClosed(BatcherClosed):
    """The runner was closed before or during the call."""


class _RemoteTraceback(Exception):
    """Attached as `__cause__` of an error re-raised from the child, to show where it happened."""

    def __str__(self) -> str:
        return str(self.args[0])


class _ArrayRef(NamedTuple):  # stands for an ndarray copied into the output block
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


class ProcessRunner:
    """Run `fn(batch, meta)` in a child process; the batch array travels through shared memory.

    `fn` must be picklable (module-level, or a `functools.partial` of one). Calls are serialised.
    ndarrays in the result (inside plain lists/tuples/dicts) come back as views into one private
    copy of the output block per call (never views on the shared block itself).
    `input_buffer()` hands out the input block itself for zero-copy filling; it stays valid until
    the next `input_buffer()`/call/`close()`, so callers on several threads must hold their own
    lock across `input_buffer()` and the call.
    """

    def __init__(self, fn: Callable[[np.ndarray, Any], list[Any]], *, name: str = "batch",
                 call_timeout_s: float | None = 30.0, start_timeout_s: float = 120.0,
                 initial_bytes: int = 1 << 20, child_threads: int | None = None) -> None:
        try:  # once, here: an unpicklable fn fails now, in the caller, with a clear message
            self._fn_bytes = pickle.dumps(fn)
        except Exception as e:
            raise TypeError(f"ProcessRunner {name!r}: fn must be picklable (a module-level function "
                            f"or a functools.partial of one): {e}") from e
        self.name, self.call_timeout_s, self.start_timeout_s = name, call_timeout_s, start_timeout_s
        self.initial_bytes, self.child_threads = max(4096, initial_bytes), child_threads
        self.restarts = 0
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(3)}_"
        self._ctx = mp.get_context("spawn")  # never fork: the parent has threads, CUDA can't re-init
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self._in: SharedMemory | None = None
        self._out: SharedMemory | None = None
        self._in_addr = 0
        self._seq = 0
        self._crashed = False  # the last child died abnormally: the next start is a restart
        self._closed = False
        ref = weakref.ref(self)
        self._atexit = lambda: (r := ref()) is not None and r.close()
        atexit.register(self._atexit)  # runs before multiprocessing's own exit hook (LIFO)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def start(self) -> None:
        """Start the child now (idempotent); otherwise the first call starts it."""
        with self._lock:
            self._ensure_started()

    def input_buffer(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
        """A writable view on the input block (grown if needed) to fill in place before a call."""
        dtype = np.dtype(dtype)
        with self._lock:
            if self._closed:
                raise RunnerClosed(f"runner {self.name!r} is closed")
            self._ensure_input(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            assert self._in is not None
            return _view(self._in.buf, shape, dtype)

    def __call__(self, batch: np.ndarray, meta: Any = None) -> list[Any]:
        batch = np.asarray(batch)
        if batch.dtype.hasobject:
            raise TypeError("object arrays cannot go through shared memory")
        with self._lock:
            self._ensure_started()
            in_place = (self._in is not None and batch.flags.c_contiguous and batch.nbytes <= self._in.size
                        and batch.__array_interface__["data"][0] == self._in_addr)
            if not in_place:
                self._ensure_input(batch.nbytes)
                assert self._in is not None
                _view(self._in.buf, batch.shape, batch.dtype)[...] = batch
            assert self._in is not None and self._out is not None
            deadline = None if self.call_timeout_s is None else time.monotonic() + self.call_timeout_s
            self._send(("call", self._in.name, batch.shape, batch.dtype, meta, self._out.name))
            while True:
                msg = self._recv(deadline, "call")
                if msg[0] == "need":  # the result does not fit: grow the output block
                    try:
                        self._out = self._new_block(msg[1], self._out)
                    except Exception:
                        self._reset(crashed=True)  # the child waits for a block it won't get
                        raise
                    self._send(("out", self._out.name))
                elif msg[0] == "ok":
                    return _unpack(msg[1], self._out.buf)
                else:
                    raise msg[1] from _RemoteTraceback(msg[2])

    def close(self) -> None:
        """Stop the child and unlink every block (idempotent). A call in flight raises RunnerClosed."""
        self._closed = True
        atexit.unregister(self._atexit)
        if not self._lock.acquire(blocking=False):
            proc = self._proc  # a call is in flight: kill the child so that call fails now
            if proc is not None:
                proc.kill()
            self._lock.acquire()
        try:
            if self._proc is not None and self._conn is not None:
                try:  # idle: ask politely, so a CUDA context is torn down cleanly
                    self._conn.send(None)
                    self._proc.join(2.0)
                except OSError:
                    pass
            self._reset()
        finally:
            self._lock.release()

    # -- internals (called with self._lock held) --

    def _ensure_started(self) -> None:
        if self._closed:
            raise RunnerClosed(f"runner {self.name!r} is closed")
        if self._proc is not None:
            return
        t0 = time.monotonic()
        conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child_main, args=(child_conn, self._fn_bytes, self.child_threads),
                                 name=f"batchrtc-{self.name}", daemon=True)
        proc.start()
        child_conn.close()  # only the child holds its end now: EOF here means the child is gone
        self._proc, self._conn = proc, conn
        if self._crashed:
            self.restarts, self._crashed = self.restarts + 1, False
        if self._closed:  # close() raced with the start
            self._reset()
            raise RunnerClosed(f"runner {self.name!r} is closed")
        try:
            msg = self._recv(time.monotonic() + self.start_timeout_s, "start")
            if msg[0] != "ready":
                self._reset(crashed=True)
                raise WorkerCrashed(f"worker batchrtc-{self.name} failed to start:\n{msg[1]}")
        except WholeBatchError as e:
            e.isolate = False  # the worker, not any item, is at fault: nothing to isolate
            raise
        if self._out is None:
            self._out = self._new_block(self.initial_bytes)
        logger.info("worker batchrtc-%s started (pid %s) in %.2f s", self.name, proc.pid, time.monotonic() - t0)

    def _ensure_input(self, nbytes: int) -> None:
        if self._in is None or self._in.size < nbytes:
            self._in = self._new_block(nbytes, self._in)
            a = np.frombuffer(self._in.buf, np.uint8)
            self._in_addr = a.__array_interface__["data"][0]
            del a  # no lasting export: the block must stay closable

    def _new_block(self, nbytes: int, old: SharedMemory | None = None) -> SharedMemory:
        size = max(self.initial_bytes, 1 << max(nbytes - 1, 0).bit_length())  # next power of two
        _check_shm_room(size)
        self._seq += 1
        shm = SharedMemory(name=f"{self.shm_prefix}{self._seq}", create=True, size=size)
        if old is not None:
            _drop(old, unlink=True)  # the child still maps it; it attaches the new name on its next use
        return shm

    def _send(self, msg: Any) -> None:
        assert self._conn is not None
        try:
            self._conn.send(msg)
        except (ConnectionError, EOFError):
            self._died()

    def _recv(self, deadline: float | None, what: str) -> Any:
        assert self._conn is not None and self._proc is not None
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait([self._conn, self._proc.sentinel], timeout)  # sleeps without the GIL
        if not ready:
            pid = self._proc.pid
            limit = self.call_timeout_s if what == "call" else self.start_timeout_s
            logger.warning("worker batchrtc-%s (pid %s): %s took over %s s; killing it", self.name, pid, what, limit)
            self._reset(crashed=True)
            raise WorkerTimeout(f"worker batchrtc-{self.name} (pid {pid}) timed out: {what} took longer "
                                f"than {limit} s; it was killed, the next call starts a fresh one")
        if self._conn in ready:
            try:
                return self._conn.recv()
            except (EOFError, ConnectionError):
                pass
            except Exception as e:  # the whole message was read: the stream is still in step
                raise RuntimeError(f"could not unpickle the reply of worker batchrtc-{self.name}: {e!r}") from e
        self._died()

    def _died(self) -> NoReturn:
        assert self._proc is not None
        pid = self._proc.pid
        self._proc.join(5.0)
        code = self._proc.exitcode
        self._reset(crashed=True)
        if self._closed:
            raise RunnerClosed(f"runner {self.name!r} was closed during the call")
        how = f"exit code {code}"
        if code is not None and code < 0:
            how += f" ({signal.Signals(-code).name})"
        logger.error("worker batchrtc-%s (pid %s) died with %s", self.name, pid, how)
        raise WorkerCrashed(f"worker batchrtc-{self.name} (pid {pid}) died with {how}; "
                            f"the next call starts a fresh one")

    def _reset(self, crashed: bool = False) -> None:
        """Stop the child (terminate, then kill) and unlink every block."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        if conn is not None:
            conn.close()
        for shm in (self._in, self._out):
            if shm is not None:
                _drop(shm, unlink=True)
        self._in = self._out = None
        self._crashed = self._crashed or crashed


def _check_shm_room(size: int) -> None:
    """A block larger than /dev/shm's free space would be created fine (tmpfs allocates lazily)
    and then kill the process with SIGBUS on first write: refuse it with a clear error instead.
    Docker's default /dev/shm is 64 MiB; a batch of 64 640x480 frames needs ~2 x 64 MiB."""
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:  # no /dev/shm (not Linux): nothing to check
        return
    if size > free:
        raise MemoryError(
            f"shared memory: a {size / 2**20:.0f} MiB block does not fit in /dev/shm "
            f"({free / 2**20:.0f} MiB free); give the container more (docker run --shm-size=1g) "
            "or lower the batch size"
        )


def _drop(shm: SharedMemory, unlink: bool) -> None:
    if unlink:
        try:
            shm.unlink()
        except FileNotFoundError:
            pass
    try:
        shm.close()
    except BufferError:
        # Someone still holds a view (fn kept its batch, a caller an old input_buffer()): let the
        # mapping live as long as those views do, and just close the file descriptor.
        shm._buf = shm._mmap = None  # type: ignore[attr-defined]
        shm.close()


def _view(buf: memoryview, shape: Any, dtype: Any, offset: int = 0) -> np.ndarray:
    # np.frombuffer, not np.ndarray(buffer=): only the former holds an export on the mapping, so a
    # block with live views cannot be unmapped under them (the latter would dangle: segfault).
    dtype = np.dtype(dtype)
    return np.frombuffer(buf, dtype, int(np.prod(shape, dtype=np.int64)), offset).reshape(shape)


def _walk(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """Rebuild plain lists/tuples/dicts with `leaf` applied to everything else."""
    t = type(obj)
    if t is list:
        return [_walk(x, leaf) for x in obj]
    if t is tuple:
        return tuple(_walk(x, leaf) for x in obj)
    if t is dict:
        return {k: _walk(v, leaf) for k, v in obj.items()}
    return leaf(obj)


def _pack(result: Any) -> tuple[Any, list[tuple[int, np.ndarray]]]:
    """Replace each ndarray by an _ArrayRef at an aligned offset; also return (offset, array) pairs."""
    arrays: list[tuple[int, np.ndarray]] = []

    def leaf(obj: Any) -> Any:
        if type(obj) is not np.ndarray or obj.dtype.hasobject:
            return obj  # left to pickle
        off = arrays[-1][0] + -(-arrays[-1][1].nbytes // _ALIGN) * _ALIGN if arrays else 0
        arrays.append((off, obj))
        return _ArrayRef(off, obj.shape, obj.dtype)

    return _walk(result, leaf), arrays


def _packed_size(arrays: list[tuple[int, np.ndarray]]) -> int:
    """Bytes of block `_write_packed` needs for `_pack`'s arrays."""
    return arrays[-1][0] + arrays[-1][1].nbytes if arrays else 0


def _write_packed(buf: memoryview, arrays: list[tuple[int, np.ndarray]]) -> None:
    """Copy `_pack`'s arrays to their offsets in `buf` (which `_unpack` then reads)."""
    for off, a in arrays:
        _view(buf, a.shape, a.dtype, off)[...] = a


def _unpack(packed: Any, buf: memoryview) -> Any:
    """Not views on the block (it is reused by the next call): one copy of the used region, and
    each array a view into that copy. One big copy instead of one per frame: for 16 640x480
    frames ~1 ms instead of ~4.6 ms of mostly page faults, in the front end's GIL."""
    refs: list[_ArrayRef] = []
    _walk(packed, lambda o: refs.append(o) if type(o) is _ArrayRef else None)
    if not refs:
        return packed
    end = max(r.offset + int(np.prod(r.shape, dtype=np.int64)) * np.dtype(r.dtype).itemsize for r in refs)
    private = np.frombuffer(buf, np.uint8, end).copy()
    return _walk(packed, lambda o: _view(private, o.shape, o.dtype, o.offset) if type(o) is _ArrayRef else o)


# -- the child --

def _child_main(conn: Connection, fn_bytes: bytes, child_threads: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C hits the process group; the parent decides
    parent = mp.parent_process()
    if parent is not None:  # exit with the parent even while fn is stuck (the loop sees EOF only between calls)
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    try:
        if child_threads:
            import torch
            torch.set_num_threads(child_threads)
        fn = pickle.loads(fn_bytes)
    except Exception:
        conn.send(("fatal", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    blocks: dict[str, SharedMemory] = {}
    while True:
        try:
            msg = conn.recv()
            if msg is None:
                break
            reply = _serve(conn, fn, blocks, msg)
            try:
                conn.send(reply)
            except ConnectionError:
                raise
            except Exception as e:  # an unpicklable result: pickling fails before anything is written
                conn.send(_error_reply(e))
            del msg, reply  # hold no views on the blocks between calls
        except (EOFError, ConnectionError):
            break  # the parent is gone
    for shm in blocks.values():
        _drop(shm, unlink=False)  # the parent owns (and unlinks) every block


def _exit_with(parent: Any) -> None:
    parent.join()
    os._exit(0)


def _serve(conn: Connection, fn: Callable[[np.ndarray, Any], Any], blocks: dict[str, SharedMemory],
           msg: tuple[Any, ...]) -> tuple[Any, ...]:
    _, in_name, shape, dtype, meta, out_name = msg
    try:
        batch = _view(_attach(blocks, "in", in_name).buf, shape, dtype)
        result = fn(batch, meta)
        del batch
        packed, arrays = _pack(result)
        total = _packed_size(arrays)
        out = _attach(blocks, "out", out_name)
        if total > out.size:
            conn.send(("need", total))
            out = _attach(blocks, "out", conn.recv()[1])
        _write_packed(out.buf, arrays)
        return ("ok", packed)
    except Exception as e:
        return _error_reply(e)


def _attach(blocks: dict[str, SharedMemory], role: str, name: str) -> SharedMemory:
    shm = blocks.get(role)
    if shm is None or shm.name != name:
        if shm is not None:
            _drop(shm, unlink=False)
        shm = blocks[role] = SharedMemory(name=name)
    return shm


def _error_reply(e: BaseException) -> tuple[str, BaseException, str]:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    e.__traceback__ = None  # its frames hold the batch view
    try:  # it must also unpickle, or the parent could not read the reply
        pickle.loads(pickle.dumps(e))
        return ("err", e, tb)
    except Exception:
        return ("err", RuntimeError(f"{type(e).__module__}.{type(e).__qualname__}: {e}\n\n{tb}"), tb)
