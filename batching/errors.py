"""Exceptions raised by the batching engine.

All derive from :class:`BatchingError`; each also derives from the builtin that callers would
naturally catch (``TimeoutError`` for a missed deadline, ``RuntimeError`` otherwise).
"""

from __future__ import annotations


class BatchingError(Exception):
    """Base class of every error raised by :mod:`batching`."""


class QueueFullError(BatchingError, RuntimeError):
    """``submit`` was refused because the batcher's bounded queue is full (back-pressure)."""


class DeadlineExceeded(BatchingError, TimeoutError):
    """A ``drop_if_late`` item's deadline passed before it could run; it was dropped."""


class BatcherClosed(BatchingError, RuntimeError):
    """The batcher was closed before the item ran, or ``submit`` was called after ``close``."""




class SlotsExhausted(BatchingError, RuntimeError):
    """Every slot of a :class:`~batching.slots.StateSlots` table is in use."""


class WholeBatchError(BatchingError):
    """Raised by a batch function when the batch as a whole failed, not an item in it: every
    item gets the error, without bisecting, which would only repeat the failure once per half.

    With ``isolate = True`` (a worker process that died or hung: which item caused it is
    unknown, and finding out costs one failure per try), items submitted with a ``source``
    are not failed but retried alone; a source whose item then fails alone again is faulty
    (:class:`FaultySource`), and everyone else's items carry on."""

    isolate = False


class ResultCountError(WholeBatchError, RuntimeError):
    """The batch function returned a number of results different from the number of items
    (a bug in the function for that batch: no item can be trusted, none is retried)."""


class FaultySource(BatchingError, RuntimeError):
    """Items of this source made the batch function fail as a whole twice, the second time
    alone in its batch; its items are refused from now on (until ``forget_source``)."""

    def __init__(self, message: str, source: object = None) -> None:
        super().__init__(message)
        self.source = source
