"""Opus DTX for incoming WebRTC audio: ask the browser for it, and fill the gaps it leaves.

A browser microphone in a quiet room sends 50 Opus packets a second, each of which the server
must unprotect, reorder and decode in Python (aiortc). With `usedtx=1` in the answer's Opus
`fmtp` (RFC 7587: the receiver prefers discontinuous transmission) Chromium sends ~5 a second
while it hears silence (`benchmarks/results/bench_browser_dtx.md`).

The handler must still hear that silence: `ReplyOnPause` finds a pause in the audio it is fed,
so a turn that ends in DTX would wait for the next packet (or forever, if the client stops
sending). `GapFiller` keeps the stream's media clock (the RTP timestamps of the decoded frames)
and says how much silence to feed: the jump in timestamps when a packet arrives after a gap,
and, while none arrives, the time that passed on the wall clock (a little behind it, so the next
packet rarely lands before the silence already fed).
"""

from __future__ import annotations

import re

__all__ = ["GapFiller", "with_opus_dtx", "GAP_WAIT_S", "MAX_GAP_FILL_S"]

GAP_WAIT_S = 0.1  # no packet for this long: feed the silence the wall clock says has passed
WALL_CLOCK_LAG_S = 0.06  # wall-clock silence stays this far behind "now" (network jitter)
MAX_GAP_FILL_S = 2.0  # silence fed per gap at most: enough for any pause; then wait quietly

_OPUS_RTPMAP = re.compile(r"a=rtpmap:(\d+) opus/48000(?:/\d+)?", re.IGNORECASE)
_FMTP = re.compile(r"a=fmtp:(\d+) (.*)")
_HAS_USEDTX = re.compile(r"(^|;)\s*usedtx=")


def with_opus_dtx(sdp: str) -> str:
    """`sdp` with `usedtx=1` in the Opus `fmtp` of every audio section (a line added where
    there is none; an existing `usedtx` is left as it is)."""
    lines = sdp.split("\r\n")
    opus = {m.group(1) for line in lines if (m := _OPUS_RTPMAP.fullmatch(line))}
    if not opus:
        return sdp
    with_fmtp = {m.group(1) for line in lines if (m := _FMTP.fullmatch(line)) and m.group(1) in opus}
    out: list[str] = []
    for line in lines:
        m = _FMTP.fullmatch(line)
        if m and m.group(1) in opus and not _HAS_USEDTX.search(m.group(2)):
            line = f"{line};usedtx=1"
        out.append(line)
        m = _OPUS_RTPMAP.fullmatch(line)
        if m and m.group(1) not in with_fmtp:
            out.append(f"a=fmtp:{m.group(1)} usedtx=1")
    return "\r\n".join(out)


class GapFiller:
    """One incoming audio stream's media clock (`rate` ticks a second, 32-bit RTP time).

    Silence is also bounded by the wall clock: a budget that grows with the time that passes
    and shrinks with what is fed (frames and silence). A client that makes its timestamps
    jump ahead therefore gets no more silence fed than the time that really passed."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._next: int | None = None  # media time fed up to (RTP units, mod 2**32)
        self._arrival_end = 0  # media time at the end of the last frame that arrived
        self._arrival_t = 0.0  # when it arrived (monotonic seconds)
        self._filled = 0  # silence fed since the last frame arrived
        self._budget = 0.0  # samples the wall clock allows to be fed now
        self._budget_t: float | None = None
        self._cap = int(MAX_GAP_FILL_S * rate)

    def _refill(self, now: float) -> None:
        if self._budget_t is None:
            self._budget = WALL_CLOCK_LAG_S * self.rate
        else:
            self._budget = min(self._budget + (now - self._budget_t) * self.rate,
                               self._cap + WALL_CLOCK_LAG_S * self.rate)
        self._budget_t = now

    def on_frame(self, pts: int, samples: int, now: float) -> int:
        """A decoded frame at RTP time `pts`: how much silence to feed before it."""
        self._refill(now)
        gap = 0
        if self._next is not None:
            ahead = (pts - self._next) % (1 << 32)
            if ahead < (1 << 31):  # forward: a gap (DTX) or nothing; behind: already fed
                gap = max(0, min(ahead, self._cap - self._filled, int(self._budget)))
        self._budget -= gap + samples
        end = (pts + samples) % (1 << 32)
        if self._next is None or (end - self._next) % (1 << 32) < (1 << 31):
            self._next = end
        self._arrival_end, self._arrival_t, self._filled = end, now, 0
        return gap

    def on_wait(self, now: float) -> int:
        """No frame for a while: how much silence the wall clock says to feed now."""
        if self._next is None:
            return 0  # nothing arrived yet: no clock to follow
        self._refill(now)
        elapsed = now - self._arrival_t - WALL_CLOCK_LAG_S
        due = int(elapsed * self.rate) - ((self._next - self._arrival_end) % (1 << 32))
        due = min(due, self._cap - self._filled, int(self._budget))
        if due <= 0:
            return 0
        self._next = (self._next + due) % (1 << 32)
        self._filled += due
        self._budget -= due
        return due

    @property
    def waiting(self) -> bool:
        """Whether a gap may still need silence (the cap not reached, a clock known)."""
        return self._next is not None and self._filled < self._cap
