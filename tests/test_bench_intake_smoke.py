"""`benchmarks/bench_intake.py` end to end, small: a real server per row, real clients."""

from __future__ import annotations

import pytest

from benchmarks.bench_intake import run


@pytest.mark.parametrize("kind", ["floor", "silence"])
def test_bench_intake_measures_the_server_per_message(kind: str) -> None:
    got, command = run(kind, sessions=3, seconds=1.0)
    assert got["messages"] == 3 * 50
    assert 0 < got["us_per_message"] < 1e5, got  # some CPU, and not seconds per message
    assert ("floor_app" in command) == (kind == "floor") and "uvicorn" in command
