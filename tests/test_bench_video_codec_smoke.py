"""Smoke test for benchmarks/bench_video_codec.py: --quick (160x120, K up to 2) end to end,
report and JSON checked for every stage, the totals and the thread-scaling rows."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("aiortc")
pytest.importorskip("pylibsrtp")
pytest.importorskip("PIL")

from benchmarks import bench_video_codec as bvc  # noqa: E402


def _table(md: str, heading: str) -> list[list[str]]:
    """Data rows (cells) of the first markdown table after a heading containing ``heading``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    rows, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif in_table:
            break
    return [r for r in rows[2:]]  # drop header + separator


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.timeout(120)
def test_bench_video_codec_quick(tmp_path):
    out = tmp_path / "codec.md"
    assert bvc.main(["--quick", "--out", str(out)]) == 0
    md = out.read_text()
    data = json.loads(out.with_suffix(".json").read_text())

    # per-stage table: every stage has positive CPU, thread and wall ms
    stages = _table(md, "VP8: per-stage cost")
    keys = {s["key"] for s in data["results"][0]["stages"]}
    assert {"c_from_yuv", "c_encode", "c_tx", "s_rx", "s_decode", "s_rgb", "s_yuv", "s_stack", "s_from_rgb",
            "s_encode", "s_reformat", "s_encode_rgb", "s_rgb_fresh", "s_tx", "c_rx", "c_decode", "c_read_y"} <= keys
    assert len(stages) == len(keys)
    for row in stages:
        assert row[0] in ("server", "client")
        assert all(_num(c) > 0 for c in row[2:5]), row
    for s in data["results"][0]["stages"]:
        assert s["cpu_ms"] > 0 and s["wall_ms"] > 0 and s["frames"] > 0, s

    # totals + cores needed
    assert "totals for 64 sessions x 30 fps" in md
    totals = {r[0]: r for r in _table(md, "VP8: totals for")}
    send_row = 'server, mode="send" (no video back: no conversion back, encode or RTP out)'
    assert {"server (send-receive)", send_row, "load generators", "both"} <= totals.keys()
    assert _num(totals["server (send-receive)"][3]) > 0 and _num(totals["load generators"][3]) > 0
    t = data["results"][0]["totals"]
    for side in ("server", "server_send", "client"):
        assert t[side]["cpu_ms_per_frame"] > 0
        assert t[side]["core_s_per_s"] == pytest.approx(t[side]["cpu_ms_per_frame"] * 64 * 30 / 1000)
    # send-only = the server's stages minus what sending video back costs
    back = sum(s["cpu_ms"] for s in data["results"][0]["stages"] if s["key"] in ("s_from_rgb", "s_encode", "s_tx"))
    assert t["server_send"]["cpu_ms_per_frame"] == pytest.approx(t["server"]["cpu_ms_per_frame"] - back)

    # thread scaling: K=1 and K=2 for both chains, frames/s > 0
    scaling = _table(md, "VP8: thread scaling")
    for work in ("codec chain", "python chain"):
        ks = {int(r[1]): _num(r[2]) for r in scaling if r[0] == work}
        assert set(ks) == {1, 2} and all(v > 0 for v in ks.values()), (work, ks)
    for work in ("codec_chain", "python_chain"):
        rows = data["results"][0]["scaling"][work]
        assert [r["threads"] for r in rows] == [1, 2]
        assert all(r["fps"] > 0 and r["frames"] > 0 for r in rows)

    # streams and the written-out conclusions
    for stream in data["results"][0]["streams"].values():
        assert stream["srtp_bytes_per_frame"] > 0 and stream["packets_per_frame"] >= 1
    assert re.search(r"Server: [\d.]+ ms of CPU per frame -> \*\*[\d.]+ core-s/s\*\*", md)
    assert data["meta"]["options"]["width"] == 160 and data["meta"]["command"].endswith(f"--out {out}")
