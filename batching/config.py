"""A batcher's policy as one frozen, validated value, named as Triton names it
(`dynamic_batching { max_batch_size, max_queue_delay_microseconds, default_queue_policy {
max_queue_size, timeout_action } }`), so operators read the same words everywhere: in code,
in the start-up log, on `/health`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64  # a full batch runs at once
    max_queue_delay_ms: float = 10.0  # the oldest item waits at most this for company
    max_queue_size: int = 4096  # beyond it a submit is refused (QueueFullError)
    deadline_ms: float | None = None  # each item's budget from submit to result
    drop_if_late: bool = False  # Triton's timeout_action REJECT (video) vs DELAY (audio)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.deadline_ms is not None and self.deadline_ms <= 0:
            raise ValueError(f"deadline_ms must be positive, got {self.deadline_ms}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
