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


def _workload(pause_frames: list[int], speech_end_s: list[float]) -> br.Workload:
    return br.Workload(name="w", frame_ms=20, messages=["{}"] * 400, duration_s=8.0,
                       pause_frames=pause_frames, speech_end_s=speech_end_s,
                       pause_chunk_end_s=[e + 0.6 for e in speech_end_s], spans=[])


def test_scoring_takes_each_reply_start_after_its_pause_as_fastrtc_logs_one_per_chunk():
    """FastRTC 0.0.34 sends `response_starting` for every audio chunk of a reply; ours once per
    reply. Reply k starts at the first one after the k-th `pause_detected` either way."""
    wl = _workload([100, 300], [1.5, 5.5])
    t0 = 1000.0
    fastrtc_events = [
        (t0 + 2.20, "pause_detected"), (t0 + 2.25, "response_starting"), (t0 + 2.26, "media"),
        (t0 + 2.27, "response_starting"), (t0 + 2.28, "media"),  # the same reply's second chunk
        (t0 + 2.29, "response_starting"), (t0 + 2.30, "media"),
        (t0 + 6.20, "pause_detected"), (t0 + 6.30, "response_starting"), (t0 + 6.31, "media"),
    ]
    cl = {"connected": True, "errors": [], "events": fastrtc_events, "close_code": 1000,
          "offset_s": 0.0, "pause_sent": {100: t0 + 2.1, 300: t0 + 6.1}}
    res = br.StepResult("fastrtc", 1, 20, "cmd")
    br._score_client(res, cl, wl, t0, 0.02)
    assert (res.replies_ok, res.errors, res.mismatches) == (2, 0, 0)
    # The second reply is timed from its own start (6.31 s), not from the first reply's chunks.
    assert res.e2r_ms == pytest.approx([(2.26 - 1.5) * 1e3, (6.31 - 5.5) * 1e3])
    assert res.overhead_ms == pytest.approx([160.0, 210.0])


def test_the_fastrtc_mode_needs_another_environment():
    with pytest.raises(SystemExit):
        br.parse_args(["--modes", "fastrtc", "--fastrtc-python", ""])
    with pytest.raises(ValueError, match="fastrtc-python"):
        br.ServerProcess("fastrtc", concurrency=4)
    srv = br.ServerProcess("fastrtc", concurrency=4, fastrtc_python="/opt/fastrtc/bin/python")
    assert srv.argv[0] == "/opt/fastrtc/bin/python"
    assert srv.argv[1:4] == ["-m", "uvicorn", "benchmarks.fastrtc_app:app"]
    assert srv.env["HF_HUB_OFFLINE"] == "1"
    assert srv.env["FASTRTC_SILERO_ONNX"].endswith("silero_vad.onnx")
    assert "/opt/fastrtc/bin/python -m uvicorn benchmarks.fastrtc_app:app" in srv.command
