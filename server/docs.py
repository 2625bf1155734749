"""docs routes (being written)."""

from __future__ import annotations

from typing import Any


def add_routes(router: Any, stream: Any) -> None:
    """Add this module's routes to the stream's router."""
