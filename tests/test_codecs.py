"""G.711 mu-law: the encoder's lookup table against the formula and against audioop (bit-exact,
every int16 value), decode(encode(x)) within a G.711 step, and the reply media messages built
from it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from server.codecs import _encode_formula, ulaw_decode, ulaw_encode

ALL = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)


def test_the_table_encodes_every_int16_as_the_formula_does() -> None:
    assert ulaw_encode(ALL) == _encode_formula(ALL).tobytes()
    # Any shape and a non-contiguous view encode their samples in order.
    two_d = ALL[:4000].reshape(2, 2000)
    assert ulaw_encode(two_d) == _encode_formula(two_d.reshape(-1)).tobytes()
    assert ulaw_encode(ALL[::7]) == _encode_formula(ALL[::7]).tobytes()


def test_other_integer_widths_clip_like_audioop() -> None:
    wide = np.array([-10**6, -32769, 32768, 10**6], dtype=np.int32)
    assert ulaw_encode(wide) == _encode_formula(wide).tobytes()
    assert ulaw_encode(wide)[0] == ulaw_encode(np.array([-32768], np.int16))[0]


def test_bit_exact_with_audioop_where_python_still_has_it() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # removed in Python 3.13
    assert ulaw_encode(ALL) == audioop.lin2ulaw(ALL.tobytes(), 2)
    codes = bytes(range(256))
    assert ulaw_decode(codes).tobytes() == audioop.ulaw2lin(codes, 2)


def test_decode_of_encode_is_within_one_step() -> None:
    back = ulaw_decode(ulaw_encode(ALL)).astype(np.int64)
    err = np.abs(back - ALL.astype(np.int64))
    # G.711's step doubles per segment: at most half of the largest (1024 -> 512) plus bias.
    assert err.max() <= 1024 and np.median(err) < 200


@pytest.mark.parametrize("phone_mode", [False, True])
async def test_reply_media_messages_are_json_whatever_the_stream_id(phone_mode: bool) -> None:
    # Reply frames are built as text, not json.dumps: the client-chosen streamSid (quotes,
    # backslashes, control characters, non-ASCII) must still come out as valid JSON.
    import asyncio
    import base64
    import json
    import logging
    from types import SimpleNamespace

    from server.frontends.media_socket import WebSocketAudioSink, WebSocketChannel, _Media
    from server.utils import RateLimitedLog

    sid = 'a"b\\c\n\u2028\u00e9}{'
    channel = WebSocketChannel(asyncio.get_running_loop(), RateLimitedLog(logging.getLogger("t"), "t"))
    session = SimpleNamespace(webrtc_id=sid, handler=SimpleNamespace(output_sample_rate=24000))
    sink = WebSocketAudioSink(session, channel, phone_mode)  # type: ignore[arg-type]
    pcm = ALL[::331].copy()
    await sink.write(pcm)
    item = channel.queue.get_nowait()
    assert isinstance(item, _Media)
    msg = json.loads(item.text)
    assert msg["event"] == "media"
    assert base64.b64decode(msg["media"]["payload"]) == ulaw_encode(pcm)
    if phone_mode:
        assert msg["streamSid"] == sid
    else:
        assert "streamSid" not in msg
