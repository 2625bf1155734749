"""Smoke test of benchmarks/bench_reply.py: its real machinery (separate uvicorn server
process, spawn client worker, exact pause replay, scoring) for N=2 batched sessions on a
few seconds of speech. Checks a complete row comes out; latency targets are not asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_reply as br


@pytest.mark.timeout(120)
def test_bench_reply_two_batched_sessions_get_every_reply(tmp_path):
    # First utterance of the fixture only (speech 0-1.96 s) + 1.5 s of silence: 1 pause.
    workloads = br.build_workloads(
        ["speech_pause_speech_16k.wav"], frame_ms=20, tail_s=1.5, max_audio_s=3.5
    )
    (wl,) = workloads
    assert len(wl.pause_frames) == 1
    assert wl.speech_end_s[0] == pytest.approx(1.9623)
    assert wl.pause_chunk_end_s[0] > wl.speech_end_s[0]

    server = br.ServerProcess("batched", concurrency=8, log_dir=tmp_path)
    try:
        with server:
            assert server.env["BATCHRTC_VAD_MAX_BATCH"] == "512"
            r = br.run_step(server, 2, workloads, br.StepOptions(tail_s=1.5, client_procs=1))
        proc = server.proc
    finally:
        server.stop()
    assert proc is not None and proc.poll() is not None  # the server process is gone

    assert r.connected == 2
    assert (r.replies_ok, r.replies_expected) == (2, 2), r.error_samples
    assert r.errors == 0, r.error_samples
    assert r.mismatches == 0
    assert len(r.overhead_ms) == len(r.e2r_ms) == len(r.detect_ms) == 2
    assert r.barge_in == [False, False]  # one utterance: no earlier reply to interrupt
    # The reply can only start after the pause chunk was sent (overhead > 0), and end of
    # speech -> reply includes the chunking floor.
    assert all(0 < o < 5000 for o in r.overhead_ms), r.overhead_ms
    assert all(e >= f for e, f in zip(r.e2r_ms, r.floor_ms)), (r.e2r_ms, r.floor_ms)
    assert r.server_cpu_pct is not None and r.server_rss_mb and r.server_rss_mb > 10

    row = br.table_row(r)
    assert row.startswith("| batched | 2 | 2/2 | 0 |"), row
    json.dumps(br.step_to_json(r))  # raw numbers serialise
    md = br.render_markdown(
        [r],
        {
            "date": "now", "machine": br.machine_info(), "command": "test",
            "server_command": server.command, "client_desc": "1 process", "frame_ms": 20,
            "fixtures": [wl.name], "expected_per_fixture": {wl.name: 1}, "floor_p50": r.floor_ms[0],
            "floor_min": r.floor_ms[0], "floor_max": r.floor_ms[0],
            "verdict_lines": br.target_verdict([r])[1],
        },
    )
    assert br.TABLE_HEADER in md and row in md
