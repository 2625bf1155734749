"""One loop that drains a handler's output for every front end.

`pump_outputs(session, sink)` awaits the session's validated outputs (`Session.next_output`),
hands `AdditionalOutputs` to `output_stream` readers and the client, converts audio to the
connection's rate and writes it to a front-end `AudioSink`, and on `CloseStream` lets the
sink play out, tells the client `end_stream` and closes the session.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .audio_out import AudioOut
from .utils import create_message

if TYPE_CHECKING:
    from .session import Session


class AudioSink(Protocol):
    """Where a connection's reply audio goes (mono int16 at `rate`)."""

    rate: int
    sends_audio: bool

    def pending(self) -> bool:
        """True when part of a frame is held back waiting for more audio."""

    async def write(self, pcm: np.ndarray) -> None:
        """Queue audio; may wait (back-pressure: the handler is slowed to the client's pace)."""

    async def idle(self) -> None:
        """No output came for a while: send what is held back."""

    async def drain(self) -> None:
        """Wait until what was written has been played."""


IDLE_FLUSH_S = 0.04  # a reply that pauses this long gets its partial frame played out


async def pump_outputs(session: Session, sink: AudioSink) -> None:
    conv = AudioOut(sink.rate)
    nxt: asyncio.Future | None = None
    try:
        while session.active:
            if nxt is None and not sink.pending():
                # Nothing held back, so no idle flush to time: await the output itself. A task
                # and `asyncio.wait` cost three more turns of the event loop per output, and
                # under load a turn is tens of ms (measured: 0.5 s from a reply's first chunk
                # to its write at 200 sessions).
                out = await session.next_output()
            else:
                if nxt is None:
                    nxt = asyncio.ensure_future(session.next_output())
                done, _ = await asyncio.wait({nxt}, timeout=IDLE_FLUSH_S if sink.pending() else None)
                if not done:
                    await sink.idle()
                    continue
                out, nxt = nxt.result(), None
            # Only what is still to be sent is held across a wait: the handler's array (its
            # rate, maybe float) would otherwise stay alive while the sink paces the reply and
            # then until the next output, per connection.
            extra, audio, close = out.extra, out.audio, out.close
            del out
            if extra is not None:
                session.push_outputs(extra)
            if audio is not None and sink.sends_audio:
                pcm, audio = conv.convert(*audio), None
                if pcm.size:
                    await sink.write(pcm)
                pcm = None
            if close is not None:
                await sink.drain()
                session.send(create_message("end_stream", close.msg))
                session.close("handler closed the stream")
                return
    finally:
        if nxt is not None:
            nxt.cancel()
