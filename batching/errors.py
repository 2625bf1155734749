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


class ResultCountError(BatchingError, RuntimeError):
    """The batch function returned a number of results different from the number of items."""


class SlotsExhausted(BatchingError, RuntimeError):
    """Every slot of a :class:`~batching.slots.StateSlots` table is in use."""


class WholeBatchError(BatchingError):
    """Raised by a batch function when the batch as a whole failed, not an item in it (e.g. its
    worker process timed out or died): every item gets the error, without bisecting, which
    would only repeat the failure once per half."""
