"""The shared VAD engine's thread setting: the worker runs with the engine's own torch thread
count, the rest of the process keeps its own."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import server.vad_engine as ve
from server.vad_engine import CPU_VAD_THREADS, VADEngine, default_vad_threads


def test_default_threads_is_one_on_cpu_and_torchs_on_cuda() -> None:
    assert default_vad_threads("cpu") == CPU_VAD_THREADS == 1
    assert default_vad_threads("cuda:0") is None


@pytest.mark.parametrize("threads, expected", [(None, CPU_VAD_THREADS), (2, 2), (0, None)])
async def test_worker_thread_runs_with_the_engine_thread_count(threads, expected) -> None:
    main_before = torch.get_num_threads()
    seen: dict[str, object] = {}
    eng = VADEngine(device="cpu", capacity=4, threads=threads)
    run = eng._run_batch

    def spy(items):
        seen["threads"] = torch.get_num_threads()
        seen["thread"] = threading.current_thread().name
        return run(items)

    eng.batcher.fn = spy
    stream = eng.open_stream(16000)
    try:
        probs = await stream.process(np.zeros(1024, np.float32))
        assert probs.shape == (2,)
    finally:
        stream.close()
        eng.close()
    assert seen["thread"] == "batcher-silero_vad"
    if expected is None:  # torch's default: what any new thread starts with (not necessarily
        fresh: list[int] = []  # the main thread's, which importing silero_vad may have changed)
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
        expected = fresh[0]
    assert seen["threads"] == expected
    assert torch.get_num_threads() == main_before  # the caller's setting is untouched


def test_env_sets_the_process_wide_engine_threads(monkeypatch) -> None:
    monkeypatch.setenv("BATCHRTC_VAD_THREADS", "2")
    saved = ve._default_engine
    ve.set_vad_engine(None)
    try:
        eng = ve.get_vad_engine()
        assert eng.threads == 2
        eng.close()
    finally:
        ve.set_vad_engine(saved)


def test_negative_threads_is_refused() -> None:
    with pytest.raises(ValueError, match="threads"):
        VADEngine(device="cpu", capacity=1, threads=-1)
