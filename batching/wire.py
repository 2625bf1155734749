"""Small messages between processes over an asyncio stream: a 4-byte length, then a pickle.

Only descriptors, ids, additional-input values and small results travel here; payloads go
through shared memory (`batching.shm`). A message over `MAX_MESSAGE` is refused on both sides,
so a bug cannot make either process buffer without bound.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

__all__ = ["MAX_MESSAGE", "encode", "read_message", "portable", "WireError"]

MAX_MESSAGE = 16 << 20
_HEADER = struct.Struct("!I")


class WireError(ConnectionError):
    """The peer sent something that is not a message of this protocol."""


def encode(msg: Any) -> bytes:
    body = pickle.dumps(msg, protocol=5)
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"message of {len(body)} bytes is over the {MAX_MESSAGE}-byte limit")
    return _HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message; `asyncio.IncompleteReadError` at EOF."""
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if n > MAX_MESSAGE:
        raise WireError(f"message of {n} bytes announced; the limit is {MAX_MESSAGE}")
    return pickle.loads(await reader.readexactly(n))


def portable(e: BaseException) -> BaseException:
    """`e` if it pickles and unpickles as itself (to send it to the other process), else a
    RuntimeError saying what it was. Drops the traceback (its frames may hold big arrays)."""
    e.__traceback__ = None
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__module__}.{type(e).__qualname__}: {e}")
