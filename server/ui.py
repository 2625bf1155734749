"""The Gradio `/ui` (being written)."""

from __future__ import annotations

from typing import Any


def attach_ui(stream: Any) -> None:
    """Mount the stream's Gradio interface at `/ui`."""
