"""bench_reply's markdown is a function of its .json: rendering a committed run again gives
the same table, plus issue 16's verdicts decided from the rows (not typed in)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks import bench_reply as br

RESULT = Path(__file__).resolve().parents[1] / "benchmarks/results/bench_reply_pause_window.json"


def test_rendering_a_run_again_keeps_its_rows_and_decides_the_e2r_targets(tmp_path: Path) -> None:
    copy = tmp_path / RESULT.name
    shutil.copy(RESULT, copy)
    md = br.render_again(copy, "render test").read_text()
    raw = json.loads(RESULT.read_text())
    for d in raw["rows"]:
        assert f"| {d['label']} | {d['n']} | {d['replies_ok']}/{d['replies_expected']} |" in md
    assert "rendered again from its .json" in md and "render test" in md
    checked = 0
    for d in raw["rows"]:
        if d["n"] not in dict(br.E2R_TARGETS):
            continue
        checked += 1
        bound = dict(br.E2R_TARGETS)[d["n"]]
        p95 = d["e2r_pcts_ms"]["p95"]
        met = d["errors"] == 0 and d["replies_ok"] == d["replies_expected"] and p95 is not None and p95 <= bound
        line = next(x for x in md.splitlines()
                    if x.startswith(f"- {d['label']}: e2r p95 at N={d['n']} "))
        assert line.endswith("**MET**" if met else "**NOT MET**"), line
    assert checked >= 2  # the committed run has rows at N=10 and N=200


def test_memory_per_session_verdicts_are_decided_from_its_rows(tmp_path: Path) -> None:
    """memory_per_session's committed markdown is its .json rendered, and each verdict compares
    the RSS added per session, ours against FastRTC's, at the snapshot and at the peak."""
    from benchmarks import memory_per_session as mps

    result = RESULT.with_name("memory_per_session.json")
    copy = tmp_path / result.name
    shutil.copy(result, copy)
    assert mps.main(["--render-from", str(copy)]) == 0
    assert copy.with_suffix(".md").read_text() == result.with_suffix(".md").read_text()
    rows = [
        {"mode": "batched", "n": 10, "rss0": 0, "rss1": 10 * 1024 * 100, "rss_peak": 10 * 1024 * 200},
        {"mode": "fastrtc", "n": 10, "rss0": 0, "rss1": 10 * 1024 * 100, "rss_peak": 10 * 1024 * 199},
        {"mode": "batched", "n": 20, "rss0": 5, "rss1": 5 + 20 * 1024 * 50, "rss_peak": 5 + 20 * 1024 * 60},
        {"mode": "fastrtc", "n": 20, "rss0": 9, "rss1": 9 + 20 * 1024 * 50, "rss_peak": 9 + 20 * 1024 * 60},
        {"mode": "batched", "n": 30, "rss0": 0, "rss1": 1, "rss_peak": 1},  # no FastRTC row
    ]
    lines = mps.verdicts(rows)
    assert len(lines) == 2
    assert lines[0].startswith("- N=10:") and lines[0].endswith("**NOT MET**")  # peak 200 > 199
    assert lines[1].startswith("- N=20:") and lines[1].endswith("**MET**")
