"""The VAD engine's scripted batch (models/vad_core.py) against the eager pieces it replaces:
`StreamingResampler.__call__`, then each stream's pending samples continued, then
`SileroVAD.forward_windows` with per-stream window counts."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from models.resample import StreamingResampler
from models.silero import SileroVAD
from models.vad_core import VADBatchCore, script_core
from server.vad_engine import VAD_RATE, WINDOW, VADEngine


@pytest.fixture(scope="module")
def model() -> SileroVAD:
    return SileroVAD.from_package(VAD_RATE)


@pytest.fixture(scope="module")
def core(model: SileroVAD) -> torch.jit.ScriptModule:
    return script_core(model)


def _reference(model, rs, x, hist, pending, p, k, ctx, h, c):
    """The batch the eager way, one stream at a time (no shared gather)."""
    y, new_hist = rs(x, hist) if rs is not None else (x, None)
    probs, pend, hs, cs, ctxs = [], [], [], [], []
    t_max = int(k.max())
    for i in range(x.shape[0]):
        seq = torch.cat([pending[i, : int(p[i])], y[i]])
        n = int(k[i])
        w = seq[: n * WINDOW].reshape(1, n, WINDOW)
        if n:
            pr, hi, ci, cti = model.forward_windows(w, ctx[i : i + 1], h[i : i + 1], c[i : i + 1])
        else:
            pr, hi, ci, cti = torch.zeros(1, 0), h[i : i + 1], c[i : i + 1], ctx[i : i + 1]
        probs.append(torch.nn.functional.pad(pr[0], (0, t_max - n)))
        rest = seq[n * WINDOW :]
        pend.append(torch.nn.functional.pad(rest, (0, WINDOW - rest.numel())))
        hs.append(hi[0]), cs.append(ci[0]), ctxs.append(cti[0])
    return torch.stack(probs), new_hist, torch.stack(pend), torch.stack(hs), torch.stack(cs), torch.stack(ctxs)


@pytest.mark.parametrize("rate, n", [(48000, 4608), (48000, 28800), (8000, 960), (16000, 1536), (16000, 100), (44100, 2205)])
@pytest.mark.parametrize("int16", [True, False])
def test_scripted_batch_matches_the_eager_pieces(model, core, rate, n, int16) -> None:
    g = torch.Generator().manual_seed(rate + n)
    B = 6
    rs = StreamingResampler(rate, VAD_RATE) if rate != VAD_RATE else None
    n -= n % (rs.down if rs else 1)
    signal = torch.randn(B, n, generator=g) * 0.2
    x = (signal * 32768).round().clamp(-32768, 32767).to(torch.int16) if int16 else signal
    xf = x.to(torch.float32) / 32768 if int16 else x
    hist = torch.randn(B, rs.history_size, generator=g) * 0.1 if rs else None
    pending = torch.randn(B, WINDOW, generator=g) * 0.1
    p = torch.tensor([0, 1, 100, 511, 256, 37])
    m = n * (rs.up if rs else 1) // (rs.down if rs else 1)
    k = (p + m) // WINDOW
    ctx = torch.randn(B, 64, generator=g) * 0.1
    h = torch.randn(B, 128, generator=g) * 0.1
    c = torch.randn(B, 128, generator=g) * 0.1
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        got = core(x, 1 / 32768 if int16 else 1.0, hist, rs.kernel if rs else None, rs.down if rs else 1,
                   pending, p, k, int(k.max()), ctx, h, c)
        want = _reference(model, rs, xf, hist, pending, p, k, ctx, h, c)
    names = ("probs", "hist", "pending", "h", "c", "ctx")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None
            continue
        # the pending tail is compared over each stream's valid samples only
        if name == "pending":
            left = (p + m) - k * WINDOW
            for i in range(B):
                torch.testing.assert_close(a[i, : int(left[i])], b[i, : int(left[i])], atol=1e-6, rtol=0)
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda s, name=name: f"{name}: {s}")


def test_slicing_does_not_change_the_result(model) -> None:
    """The CPU path resamples in row slices and runs the front end in slices of windows, to
    fit the cache; the result must not depend on the slicing."""
    rs = StreamingResampler(48000, VAD_RATE)
    whole, sliced = VADBatchCore(model), VADBatchCore(model)
    whole.conv_slice = whole.feat_slice = 1 << 40
    sliced.conv_slice = 2 * (28800 + rs.history_size)  # two rows per conv call, 7 rows
    sliced.feat_slice = 50  # 126 windows: three front-end calls
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 28800, generator=g) * 0.1
    hist = torch.randn(7, rs.history_size, generator=g) * 0.1
    args = (x, 1.0, hist, rs.kernel, rs.down, torch.zeros(7, WINDOW), torch.zeros(7, dtype=torch.long),
            torch.full((7,), 18), 18, torch.zeros(7, 64), torch.zeros(7, 128), torch.zeros(7, 128))
    with torch.inference_mode():
        for a, b in zip(whole(*args), sliced(*args)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # BLAS may block rows differently


async def test_engine_runs_the_scripted_core_and_keeps_stream_state() -> None:
    """Through the engine: a stream fed in uneven chunks gets the same probabilities as the
    eager model over the whole signal resampled at once."""
    eng = VADEngine(device="cpu", capacity=4)
    assert isinstance(eng._core, torch.jit.ScriptModule)
    calls: list[str] = []
    run = eng._run_batch

    def spy(items):
        calls.append(threading.current_thread().name)
        return run(items)

    eng.batcher.fn = spy
    rng = np.random.default_rng(3)
    audio = (rng.standard_normal(48000 * 2) * 4000).astype(np.int16)
    stream = eng.open_stream(48000)
    try:
        got = []
        for a, b in ((0, 4608), (4608, 4611), (4611, 33411), (33411, 96000)):
            got.append(await stream.process(audio[a:b]))
        probs = np.concatenate(got)
    finally:
        stream.close()
        eng.close()
    assert calls and set(calls) == {"batcher-silero_vad"}
    rs = StreamingResampler(48000, VAD_RATE)
    y, _ = rs(torch.from_numpy(audio[None].astype(np.float32) / 32768), rs.new_history(1))
    n = y.shape[1] // WINDOW
    m = SileroVAD.from_package(VAD_RATE)
    h, c, ctx = m.new_state(1)
    with torch.inference_mode():
        want, *_ = m.forward_windows(y[:, : n * WINDOW].reshape(1, n, WINDOW), ctx, h, c)
    assert probs.shape == (n,)
    np.testing.assert_allclose(probs, want[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("rate", [48000, 16000])
def test_rows_of_different_lengths_match_each_stream_alone(model, core, rate) -> None:
    """Rows zero-padded to the longest (a session whose hops came late sends a longer one)
    give each stream what it gets alone: probabilities, history, pending tail, state."""
    g = torch.Generator().manual_seed(7)
    rs = StreamingResampler(rate, VAD_RATE) if rate != VAD_RATE else None
    up, down = (rs.up, rs.down) if rs else (1, 1)
    lengths = [n - n % down for n in (4800, 9600, 4803, 14400, 960, 7203)]
    B, n_max = len(lengths), max(lengths)
    x = torch.zeros(B, n_max)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, generator=g) * 0.2
    x[0, lengths[0]:] = 0.5  # padding is never read: make it loud, not silent
    hist = torch.randn(B, rs.history_size, generator=g) * 0.1 if rs else None
    pending = torch.randn(B, WINDOW, generator=g) * 0.1
    p = torch.tensor([0, 1, 100, 511, 256, 37])
    m = torch.tensor(lengths) * up // down
    k = (p + m) // WINDOW
    ctx = torch.randn(B, 64, generator=g) * 0.1
    h = torch.randn(B, 128, generator=g) * 0.1
    c = torch.randn(B, 128, generator=g) * 0.1
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        got = core(x, 1.0, hist, rs.kernel if rs else None, down, pending, p, k, int(k.max()),
                   ctx, h, c, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            s = slice(i, i + 1)
            want = _reference(model, rs, x[s, :n], hist[s] if rs else None, pending[s], p[s], k[s],
                              ctx[s], h[s], c[s])
            kk, left = int(k[i]), int(p[i] + m[i] - k[i] * WINDOW)
            torch.testing.assert_close(got[0][i, :kk], want[0][0, :kk], atol=1e-5, rtol=0)
            assert not got[0][i, kk:].any()
            if rs:
                torch.testing.assert_close(got[1][i], want[1][0], atol=1e-6, rtol=0)
            torch.testing.assert_close(got[2][i, :left], want[2][0, :left], atol=1e-6, rtol=0)
            for j in (3, 4, 5):  # h, c, ctx
                torch.testing.assert_close(got[j][i], want[j][0], atol=1e-5, rtol=0)


async def test_engine_batches_streams_whose_chunks_differ_in_length() -> None:
    """Chunks whose lengths share a power-of-two range share one batch; each stream's
    probabilities are the ones it gets fed alone."""
    rng = np.random.default_rng(5)
    audio = [(rng.standard_normal(48000) * 4000).astype(np.int16) for _ in range(3)]
    cuts = [(4800, 9600), (6720, 9600), (8160, 9600)]  # first chunks of three lengths
    alone = []
    for a, (c1, c2) in zip(audio, cuts):
        eng = VADEngine(device="cpu", capacity=2)
        s = eng.open_stream(48000)
        try:
            alone.append(np.concatenate([await s.process(a[:c1]), await s.process(a[c1:c1 + c2])]))
        finally:
            s.close()
            eng.close()
    eng = VADEngine(device="cpu", capacity=4, max_queue_delay_ms=200)
    sizes: list[int] = []
    run = eng._run_batch
    eng.batcher.fn = lambda items: (sizes.append(len(items)), run(items))[1]
    streams = [eng.open_stream(48000) for _ in audio]
    try:
        import asyncio
        first = await asyncio.gather(*(s.process(a[:c1]) for s, a, (c1, _) in zip(streams, audio, cuts)))
        second = await asyncio.gather(*(s.process(a[c1:c1 + c2]) for s, a, (c1, c2) in zip(streams, audio, cuts)))
    finally:
        for s in streams:
            s.close()
        eng.close()
    assert sizes[0] == 3, sizes  # 4800, 6720 and 8160 samples: one batch
    for i in range(3):
        np.testing.assert_allclose(np.concatenate([first[i], second[i]]), alone[i], atol=1e-5)


async def test_a_cpu_batch_run_in_parts_matches_one_forward_and_fails_whole(monkeypatch) -> None:
    """On CPU a batch runs CPU_ROWS_SAMPLES input samples per forward (peak memory). Seven
    streams in parts of two rows give the probabilities one forward gives, chunk after chunk
    (state carried through the parts' write-backs); a part that raises advances no stream,
    not even those of the parts that ran before it."""
    import asyncio

    import server.vad_engine as ve

    rng = np.random.default_rng(11)
    audio = [(rng.standard_normal(9600) * 4000).astype(np.int16) for _ in range(7)]

    async def run_all(rows_samples: int) -> tuple[list[np.ndarray], list[int]]:
        monkeypatch.setattr(ve, "CPU_ROWS_SAMPLES", rows_samples)
        eng = VADEngine(device="cpu", capacity=8, max_queue_delay_ms=200)
        forwards: list[int] = []
        fwd = eng._forward
        eng._forward = lambda items: (forwards.append(len(items)), fwd(items))[1]
        streams = [eng.open_stream(48000) for _ in audio]
        try:
            out = [[] for _ in audio]
            for cut in ((0, 4800), (4800, 9600)):
                got = await asyncio.gather(*(s.process(a[cut[0]:cut[1]]) for s, a in zip(streams, audio)))
                for o, g in zip(out, got):
                    o.append(g)
            return [np.concatenate(o) for o in out], forwards
        finally:
            for s in streams:
                s.close()
            eng.close()

    whole, forwards_whole = await run_all(1 << 40)
    parts, forwards_parts = await run_all(2 * 4800)
    assert forwards_whole == [7, 7]
    assert forwards_parts == [2, 2, 2, 1, 2, 2, 2, 1]
    for a, b in zip(whole, parts):
        np.testing.assert_allclose(b, a, atol=1e-5)

    # A failing third part: nothing is written back, so the retry sees every stream as it was.
    monkeypatch.setattr(ve, "CPU_ROWS_SAMPLES", 2 * 4800)
    eng = VADEngine(device="cpu", capacity=8)
    fwd = eng._forward
    calls = {"n": 0}

    def third_fails(items):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("part 3 failed")
        return fwd(items)

    streams = [eng.open_stream(48000) for _ in audio]
    try:
        before = eng.state.gather([s.slot for s in streams])
        before = {k: v.clone() for k, v in before.items()}
        items = [ve._Work(s, 48000, a[:4800], 0, 3, s.generation, s.hist_generation)
                 for s, a in zip(streams, audio)]
        eng._forward = third_fails
        with pytest.raises(RuntimeError, match="part 3"):
            eng._run_batch(items)
        after = eng.state.gather([s.slot for s in streams])
        for key in before:
            assert torch.equal(after[key], before[key]), key
    finally:
        for s in streams:
            s.close()
        eng.close()
