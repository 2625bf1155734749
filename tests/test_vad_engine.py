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


async def test_int16_and_float_input_give_the_same_probabilities_in_one_batch() -> None:
    # int16 chunks stay int16 until their batch converts them; a batch mixing int16 and
    # float32 chunks (and a stream switching between them) must see the same audio.
    import asyncio

    from benchmarks.fixtures import load_wav

    sr, audio = load_wav("speech_pause_speech_16k.wav")
    pcm = np.repeat(audio[: sr * 3], 3)  # 48 kHz-long int16 (the VAD sees it as 48 kHz)
    as_float = pcm.astype(np.float32) / 32768
    eng = VADEngine(device="cpu", capacity=8, max_queue_delay_ms=50)
    try:
        streams = [eng.open_stream(48000) for _ in range(3)]
        step = 4800
        outs: list[list[np.ndarray]] = [[], [], []]
        for k, i in enumerate(range(0, pcm.size - step + 1, step)):
            chunks = [pcm[i:i + step], as_float[i:i + step],
                      pcm[i:i + step] if k % 2 else as_float[i:i + step]]
            got = await asyncio.gather(*(s.process(c) for s, c in zip(streams, chunks)))
            for o, g in zip(outs, got):
                o.append(g)
        a, b, c = (np.concatenate(o) for o in outs)
        assert a.size > 80 and a.max() > 0.9
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(a, c, atol=1e-6)
        assert eng.batcher.stats.snapshot()["mean_batch_size"] > 1.5  # they did share batches
    finally:
        for s in streams:
            s.close()
        eng.close()
