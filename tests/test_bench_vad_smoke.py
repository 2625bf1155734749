"""Smoke test for benchmarks/bench_vad.py: tiny CPU run, every method produces a sane row."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("silero_vad")
pytest.importorskip("onnxruntime")

from benchmarks import bench_vad as bv  # noqa: E402
from server.vad_engine import default_vad_threads  # noqa: E402

CPU_METHODS = (bv.M_BATCHED, bv.M_JIT, bv.M_ORT_WRAP, bv.M_ORT_RAW)


def test_bench_vad_quick_cpu(tmp_path):
    args = bv.parse_args(["--quick", "--device", "cpu", "--batch-sizes", "1,4",
                          "--time-per-size", "0.03", "--streams", "2", "--warmup", "1",
                          "--out", str(tmp_path / "bench.md")])
    rows, summary, info = bv.run(args)

    for method in CPU_METHODS:
        assert any(r.method == method for r in rows), method
    # Headline rows at the server's VAD thread count; torch's default count as extra rows.
    headline = [r for r in rows if r.method == bv.M_BATCHED and r.extra["headline"]]
    assert sorted(r.batch for r in headline) == [1, 4]
    assert {r.threads for r in headline} == {default_vad_threads("cpu")}
    others = [r for r in rows if r.method == bv.M_BATCHED and not r.extra["headline"]]
    if info["torch_default_threads"] != default_vad_threads("cpu"):
        assert sorted(r.batch for r in others) == [1, 4]
        assert {r.threads for r in others} == {info["torch_default_threads"]}
    else:
        assert not others
    for r in rows:
        assert r.device == "cpu"
        for v in (r.step_ms, r.frames_s, r.streams, r.frames_s_per_core):
            assert v is not None and math.isfinite(v) and v > 0, r
        assert r.iters >= 5
        assert r.streams == pytest.approx(r.frames_s / 31.25)
        assert r.frames_s_per_core == pytest.approx(r.frames_s / r.threads)

    assert summary["cpu_ratio_batch"] == 4  # nearest to 256 among {1, 4}
    assert summary["cpu_threads"] == default_vad_threads("cpu")
    assert summary["ratio_vs_ort_raw"] > 0 and "cuda" not in summary
    assert 0 < summary["max_abs_err_vs_torchscript"]["cpu"] < 3e-5  # measured 7.7e-6

    md = bv.render_markdown(info, rows, summary, info["config"])
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| method | device | batch |")
    assert len(table) == 1 + len(rows)
    for method in CPU_METHODS:
        assert any(ln.startswith(f"| {method} |") for ln in table), method

    md_path, json_path = bv.write_results(md, rows, summary, info, args.out)
    assert md_path.read_text() == md
    data = json.loads(json_path.read_text())
    assert len(data["rows"]) == len(rows) and data["info"]["device_run"] == "cpu"
    assert data["info"]["command"].startswith("python -m benchmarks.bench_vad --quick")
