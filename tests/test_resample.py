"""models.resample.StreamingResampler against scipy.signal (scipy is a test-only dependency)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.signal as ss
import torch

from models.resample import StreamingResampler, design_filter

PAIRS = [(48000, 16000), (8000, 16000), (24000, 16000), (16000, 48000), (24000, 48000),
         (16000, 8000), (24000, 8000), (48000, 8000)]
ALL_PAIRS = PAIRS + [(16000, 16000)]
# Bounds a small margin over what this CPU measures, so a regression shows: SNR vs
# resample_poly >= 135 dB (speech and sines, every pair); float32 chunked/batched/numpy paths
# agree within 7.2e-7; float64 matches resample_poly within 8.9e-16.
SNR_MIN_DB = 125.0
MEASURED_SNR: dict[str, float] = {}


def _stream(rs: StreamingResampler, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed x [B, n] through rs in chunks of the given sizes (summing to n)."""
    assert sum(sizes) == x.shape[1]
    hist = rs.new_history(x.shape[0])
    outs, pos = [], 0
    for s in sizes:
        y, hist = rs(x[:, pos:pos + s], hist)
        assert y.shape == (x.shape[0], s * rs.up // rs.down)
        assert hist.shape == (x.shape[0], rs.history_size)
        outs.append(y)
        pos += s
    return torch.cat(outs, dim=1)


def _random_sizes(rng: np.random.Generator, n: int, down: int) -> list[int]:
    """Random chunk sizes that are multiples of `down` (zero-length chunks included)."""
    sizes, left = [], n
    while left > 0:
        s = min(left, down * int(rng.integers(0, 200)))
        sizes.append(s)
        left -= s
    return sizes


def _snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    err = test - ref
    return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum(err ** 2), 1e-300)))


def _aligned_snr(rs: StreamingResampler, x: np.ndarray, chunk: int) -> float:
    """SNR of float32 chunked streaming vs float64 resample_poly, aligned by rs.delay."""
    ref = ss.resample_poly(x.astype(np.float64), rs.up, rs.down, axis=-1)
    n = x.shape[-1] - x.shape[-1] % chunk
    sizes = [chunk] * (n // chunk)
    y = _stream(rs, torch.from_numpy(x[None, :n].astype(np.float32)), sizes)[0].double().numpy()
    d = rs.delay
    # Streaming output k == resample_poly output k - delay; only the last `delay` outputs of
    # resample_poly are not produced yet (they need the flush), nothing else is ignored.
    m = y.shape[0] - d
    return _snr_db(ref[:m], y[d:d + m])


# ---------------------------------------------------------------- filter / construction

@pytest.mark.parametrize("orig,new", PAIRS)
def test_filter_matches_firwin(orig: int, new: int) -> None:
    rs = StreamingResampler(orig, new)
    up, down = rs.up, rs.down
    max_rate = max(up, down)
    ref = ss.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * up
    h = design_filter(up, down).numpy()
    np.testing.assert_allclose(h, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(rs.filter.numpy(), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_attributes() -> None:
    expect = {  # (up, down, history_size, delay)
        (48000, 16000): (1, 3, 60, 10), (8000, 16000): (2, 1, 20, 20),
        (24000, 16000): (2, 3, 30, 10), (16000, 48000): (3, 1, 20, 30),
        (24000, 48000): (2, 1, 20, 20), (16000, 8000): (1, 2, 40, 10),
        (24000, 8000): (1, 3, 60, 10), (48000, 8000): (1, 6, 120, 10),
        (16000, 16000): (1, 1, 0, 0),
    }
    for (a, b), (up, down, hist, delay) in expect.items():
        rs = StreamingResampler(a, b)
        assert (rs.orig_sr, rs.new_sr, rs.up, rs.down, rs.history_size, rs.delay) == \
            (a, b, up, down, hist, delay), (a, b)
        h = rs.new_history(3)
        assert h.shape == (3, hist) and h.dtype == torch.float32 and not h.any()


def test_identity_same_rate() -> None:
    rs = StreamingResampler(16000, 16000)
    x = torch.randn(2, 480)
    y, h = rs(x, rs.new_history(2))
    assert torch.equal(y, x) and h.shape == (2, 0)
    assert torch.equal(rs.resample(x), x)


# ---------------------------------------------------------------- exactness vs resample_poly

@pytest.mark.parametrize("orig,new", ALL_PAIRS)
def test_resample_matches_resample_poly_float64(orig: int, new: int) -> None:
    """In float64 the polyphase kernel reproduces resample_poly to rounding error."""
    rs = StreamingResampler(orig, new, dtype=torch.float64)
    x = np.random.default_rng(1).standard_normal((3, rs.down * 517))
    ref = ss.resample_poly(x, rs.up, rs.down, axis=1)
    y = rs.resample(torch.from_numpy(x)).numpy()
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=3e-15, rtol=0)


@pytest.mark.parametrize("orig,new", PAIRS)
def test_streaming_is_delayed_resample_poly(orig: int, new: int) -> None:
    """Every streamed output k equals resample_poly's output k - delay, including the first
    `delay` outputs, which are resample_poly's (implicit zero-padded) outputs before t=0."""
    rs = StreamingResampler(orig, new, dtype=torch.float64)
    x = np.random.default_rng(2).standard_normal((2, rs.down * 300))
    d = rs.delay
    # Prepending c*down zeros shifts resample_poly's output by exactly c*up samples, exposing
    # its outputs at negative indices -c*up.. -1.
    c = -(-d // rs.up)
    ref = ss.resample_poly(np.pad(x, ((0, 0), (c * rs.down, 0))), rs.up, rs.down, axis=1)
    y, _ = rs(torch.from_numpy(x), rs.new_history(2))
    start = c * rs.up - d  # ref index of streamed output 0
    np.testing.assert_allclose(y.numpy(), ref[:, start:start + y.shape[1]], atol=3e-15, rtol=0)
    assert np.abs(y[:, :d].numpy()).max() > 0  # the pre-ringing is really there, and matched


# ---------------------------------------------------------------- streaming consistency

@pytest.mark.parametrize("orig,new", ALL_PAIRS)
def test_chunked_equals_one_shot(orig: int, new: int) -> None:
    rs = StreamingResampler(orig, new)
    rng = np.random.default_rng(3)
    n = 960 * 12
    x = torch.from_numpy(rng.standard_normal((1, n)).astype(np.float32))
    whole, _ = rs(x, rs.new_history(1))
    for chunk in (960, 480, 3 * rs.down, rs.down):
        if chunk % rs.down:
            continue
        got = _stream(rs, x, [chunk] * (n // chunk))
        torch.testing.assert_close(got, whole, atol=2e-6, rtol=0)  # measured 7.2e-7
    for _ in range(3):
        got = _stream(rs, x, _random_sizes(rng, n, rs.down))
        torch.testing.assert_close(got, whole, atol=2e-6, rtol=0)


@pytest.mark.parametrize("orig,new", PAIRS)
def test_batched_equals_each_alone(orig: int, new: int) -> None:
    rs = StreamingResampler(orig, new)
    rng = np.random.default_rng(4)
    n = 480 * 10
    # Different signal per stream: noise, scaled, a sine, a DC step, silence.
    t = np.arange(n) / orig
    xs = np.stack([rng.standard_normal(n), 0.1 * rng.standard_normal(n),
                   np.sin(2 * np.pi * 440 * t), (t > t[n // 2]).astype(float), np.zeros(n)])
    x = torch.from_numpy(xs.astype(np.float32))
    sizes = _random_sizes(rng, n, rs.down)
    batched = _stream(rs, x, sizes)
    for b in range(5):
        alone = _stream(rs, x[b:b + 1], sizes)
        torch.testing.assert_close(batched[b:b + 1], alone, atol=1.5e-6, rtol=0)  # measured 4.8e-7


def test_pure_function_history_not_mutated() -> None:
    rs = StreamingResampler(48000, 16000)
    x = torch.randn(2, 960)
    h0 = torch.randn(2, rs.history_size)
    h_copy = h0.clone()
    y1, h1 = rs(x, h0)
    y2, h2 = rs(x, h0)
    assert torch.equal(h0, h_copy)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    torch.testing.assert_close(h1, x[:, -rs.history_size:])


# ---------------------------------------------------------------- errors

def test_rejects_bad_chunk_length() -> None:
    rs = StreamingResampler(48000, 16000)
    with pytest.raises(ValueError, match="multiple of down=3"):
        rs(torch.zeros(1, 961), rs.new_history(1))
    with pytest.raises(ValueError, match="multiple of down=3"):
        rs.resample(torch.zeros(1, 1000))


def test_rejects_bad_history_shape() -> None:
    rs = StreamingResampler(48000, 16000)
    with pytest.raises(ValueError, match="history must have shape"):
        rs(torch.zeros(2, 960), rs.new_history(1))
    with pytest.raises(ValueError, match="history must have shape"):
        rs(torch.zeros(2, 960), torch.zeros(2, rs.history_size + 1))
    with pytest.raises(ValueError, match="history must have shape"):
        rs(torch.zeros(2, 960), torch.zeros(rs.history_size))
    with pytest.raises(ValueError, match=r"x must be \[batch, samples\]"):
        rs(torch.zeros(960), rs.new_history(1))


# ---------------------------------------------------------------- frequency response

def _tone_amplitude(y: np.ndarray, freq: float, sr: int) -> float:
    """Least-squares amplitude of a tone at `freq` in y."""
    t = np.arange(y.shape[0]) / sr
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    return float(np.hypot(*coef))


def test_passband_1khz_amplitude() -> None:
    rs = StreamingResampler(48000, 16000)
    n = 48000
    x = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(n) / 48000)
    y = _stream(rs, torch.from_numpy(x[None].astype(np.float32)), [960] * (n // 960))[0].numpy()
    steady = y[200:-200].astype(np.float64)  # skip the filter's start-up transient
    gain_db = 20 * np.log10(_tone_amplitude(steady, 1000, 16000) / 0.5)
    assert abs(gain_db) < 0.025, gain_db  # measured 0.0085 dB


def test_stopband_12khz_rejected() -> None:
    rs = StreamingResampler(48000, 16000)
    n = 48000
    x = 0.5 * np.sin(2 * np.pi * 12000 * np.arange(n) / 48000)
    y = _stream(rs, torch.from_numpy(x[None].astype(np.float32)), [960] * (n // 960))[0].numpy()
    steady = y[200:-200].astype(np.float64)
    # Whatever leaks through (12 kHz aliases to 4 kHz at 16 kHz) must be > 60 dB down.
    rms_in = 0.5 / np.sqrt(2)
    atten_db = 20 * np.log10(rms_in / max(np.sqrt(np.mean(steady ** 2)), 1e-30))
    assert atten_db > 60, atten_db  # measured 67.8 dB


# ---------------------------------------------------------------- quality vs resample_poly

@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[int, np.ndarray]:
    """Real synthetic speech at each input rate: espeak-ng -> wav, sox -> float32 at the rate."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"required tool(s) not on PATH: {', '.join(missing)} "
                    "(install Debian packages espeak-ng and sox)")
    d: Path = tmp_path_factory.mktemp("speech")
    wav = d / "speech.wav"
    text = ("The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore, "
            "and six thick thistle sticks crackled in the frost.")
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    out: dict[int, np.ndarray] = {}
    for sr in sorted({a for a, _ in PAIRS}):
        raw = d / f"speech_{sr}.f32"
        subprocess.run(["sox", str(wav), "-r", str(sr), "-c", "1", "-e", "floating-point",
                        "-b", "32", "-t", "raw", str(raw)], check=True, capture_output=True)
        x = np.fromfile(raw, dtype=np.float32)
        assert x.size > sr, f"sox produced only {x.size} samples at {sr} Hz"
        assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) > 1e-3, "speech is silent"
        out[sr] = x
    return out


@pytest.mark.parametrize("orig,new", PAIRS)
def test_snr_speech(orig: int, new: int, speech: dict[int, np.ndarray]) -> None:
    rs = StreamingResampler(orig, new)
    chunk = orig // 50 - (orig // 50) % rs.down  # 20 ms chunks
    snr = _aligned_snr(rs, speech[orig], chunk)
    MEASURED_SNR[f"speech {orig}->{new}"] = snr
    print(f"\nSNR speech {orig}->{new}: {snr:.1f} dB")
    assert snr >= SNR_MIN_DB, f"{orig}->{new}: SNR {snr:.1f} dB < {SNR_MIN_DB} dB"


@pytest.mark.parametrize("orig,new", PAIRS)
def test_snr_sum_of_sines(orig: int, new: int) -> None:
    rs = StreamingResampler(orig, new)
    n = orig * 2
    t = np.arange(n) / orig
    nyq = min(orig, new) / 2
    freqs = [110.0, 440.0, 1234.5, 0.45 * nyq, 0.8 * nyq]
    x = sum(np.sin(2 * np.pi * f * t + i) / (i + 1) for i, f in enumerate(freqs)) / 2.5
    snr = _aligned_snr(rs, x, 3 * rs.down * 37)
    MEASURED_SNR[f"sines {orig}->{new}"] = snr
    print(f"\nSNR sines {orig}->{new}: {snr:.1f} dB")
    assert snr >= SNR_MIN_DB, f"{orig}->{new}: SNR {snr:.1f} dB < {SNR_MIN_DB} dB"


# ---------------------------------------------------------------- device

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    cpu = StreamingResampler(48000, 16000)
    gpu = StreamingResampler(48000, 16000, device="cuda")
    assert gpu._weight.device.type == "cuda"
    x = torch.randn(4, 960 * 5)
    y_cpu = _stream(cpu, x, [960] * 5)
    y_gpu = _stream(gpu, x.cuda(), [960] * 5)
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rates", [(48000, 24000), (16000, 48000), (24000, 8000), (24000, 16000), (8000, 8000),
                                   (44100, 48000), (48000, 44100), (24000, 48000)])
def test_numpy_path_matches_torch_streaming(rates):
    """`process_numpy` (single-stream reply audio) equals the batched torch path, chunk by chunk."""
    rs = StreamingResampler(*rates)
    h_t, h_n = rs.new_history(1), np.zeros(rs.history_size, np.float32)
    rng = np.random.default_rng(3)
    for n in [rs.down * 7, rs.down * 480, 0, rs.down * 3, rs.down * 1001]:
        x = rng.standard_normal(n).astype(np.float32)
        yt, h_t = rs(torch.from_numpy(x)[None], h_t)
        yn, h_n = rs.process_numpy(x, h_n)
        assert yn.shape == (rs.out_len(n),)
        np.testing.assert_allclose(yn, yt[0].numpy(), atol=1.5e-6, rtol=0)  # measured 4.8e-7
        np.testing.assert_allclose(h_n, h_t[0].numpy(), atol=0)
