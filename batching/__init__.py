"""The batching engine: dynamic batching of plain callables, flush policy, state slots.

Knows no model and no front end (imports torch, numpy and the standard library only).
"""

from .batcher import DynamicBatcher
from .config import BatchingConfig
from .errors import (
    BatcherClosed,
    BatchingError,
    DeadlineExceeded,
    FaultySource,
    QueueFullError,
    ResultCountError,
    SlotsExhausted,
    WholeBatchError,
)
from .policy import FlushDecision, RuntimePredictor, decide_flush
from .process import ProcessRunner, RunnerClosed, WorkerCrashed, WorkerTimeout
from .slots import StateSlots
from .stats import BatcherStats

__all__ = [
    "BatchingConfig",
    "DynamicBatcher",
    "RuntimePredictor",
    "BatcherStats",
    "StateSlots",
    "QueueFullError",
    "DeadlineExceeded",
    "BatcherClosed",
    "SlotsExhausted",
    "BatchingError",
    "ResultCountError",
    "WholeBatchError",
    "FaultySource",
    "ProcessRunner",
    "RunnerClosed",
    "WorkerCrashed",
    "WorkerTimeout",
    "FlushDecision",
    "decide_flush",
]
