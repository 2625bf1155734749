"""Smoke test for benchmarks/bench_video.py: the real machinery (server process, aiortc load
generator process, barcode matching, report) for batched mode, N=1, tiny frames, on CPU."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("aiortc")
pytest.importorskip("psutil")

from benchmarks import bench_video as bv  # noqa: E402


def _weights_available() -> bool:
    try:
        from models.detector import weights_dir

        weights_dir()
        return True
    except (ImportError, FileNotFoundError):
        return False


def test_bench_stats_frame_counters_never_go_back_when_a_session_ends():
    """The video counters the benchmark differences over its window are lifetime totals: a
    session that ends inside the window keeps its frames (summing only the connected
    sessions made the perframe N=64 H200 row print received -28853)."""
    import threading

    from benchmarks.video_apps import bench_stats
    from server import Stream
    from server import metrics as m

    class Video:
        received, processed, dropped = 100, 90, 10

    class FakeSession:  # what bench_stats and the metrics collector read of a Session
        def __init__(self, stream, sid):
            self.stream, self.webrtc_id, self.kind, self.video = stream, sid, "webrtc", Video()
            self.closed = threading.Event()
            self._on_close = []
            stream.registry._active[sid] = self  # as tests/test_metrics.py's fake

        def on_close(self, fn):
            self._on_close.append(fn)

    stream = Stream(lambda f: f, modality="video", concurrency_limit=4)
    a, _ = FakeSession(stream, "a"), FakeSession(stream, "b")
    s0 = bench_stats(stream)
    assert s0["video"] == {"received": 200, "processed": 180, "dropped": 20}
    a.video.received += 5
    a.closed.set()
    m.session_closed(a)  # Session.close calls this hook
    del stream.registry._active["a"]
    s1 = bench_stats(stream)
    assert s1["video_live"]["received"] == 100  # only b is connected now ...
    assert s1["video"]["received"] == 205  # ... but a's frames still count
    assert all(s1["video"][k] - s0["video"][k] >= 0 for k in s0["video"])


def test_scene_barcode_round_trip():
    scene = bv.Scene(160, 120, 5)
    for i in (0, 1, 5, 4095, 4096, 12345):
        arr = scene.make_i420(i)
        y = arr[: scene.h]
        assert scene.read_index(y) == i % bv.INDEX_MOD
        y2 = y.copy()
        y2[scene.h - scene.bs :, : scene.bs] = 255 - y2[scene.h - scene.bs :, : scene.bs]  # one block flipped
        assert scene.read_index(y2) != i % bv.INDEX_MOD


@pytest.mark.timeout(120)
@pytest.mark.skipif(not _weights_available(), reason="facenet-pytorch weights not installed")
def test_bench_video_batched_one_session_cpu(tmp_path):
    argv = ["--modes", "batched", "--sessions", "1", "--width", "160", "--height", "120", "--fps", "5",
            "--duration", "3", "--warmup", "1", "--client-procs", "1", "--device", "cpu",
            "--out", str(tmp_path / "bench_video.md")]
    args = bv.parse_args(argv)
    rows, meta = bv.run(args, argv, log=lambda line: None)

    assert len(rows) == 1
    r = rows[0]
    assert (r.mode, r.n, r.device) == ("batched", 1, "cpu"), r
    assert r.connected == 1 and r.flowing == 1, r.errors
    assert r.fps_mean is not None and r.fps_mean > 0, r
    assert r.sent_fps_mean is not None and r.sent_fps_mean > 0
    for v in (r.lat_p50, r.lat_p95, r.lat_p99):
        assert v is not None and math.isfinite(v) and v > 0, r
    assert r.lat_p50 <= r.lat_p95 <= r.lat_p99
    assert r.lat_n > 0 and r.server_cpu_pct is not None
    assert r.batcher is not None and r.batcher["batches"] > 0
    assert r.server_video is not None and r.server_video["processed"] > 0

    md = bv.render_markdown(rows, meta)
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0] == bv.TABLE_HEAD and table[1].startswith("| batched | 1 |")
    assert "NOT MET (not exercised)" in md  # a CPU run never claims the GPU target
    md_path, json_path = bv.write_results(md, rows, meta, tmp_path / "bench_video.md")
    data = json.loads(json_path.read_text())
    assert data["rows"][0]["fps_mean"] == r.fps_mean and md_path.read_text() == md
