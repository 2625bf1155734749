"""What a client may send, in one place: front ends enforce these, the docs pages quote them.

A client over a rate limit is disconnected; a message over a size limit gets an `error` (or,
where the protocol cannot go on, a close that says why).
"""

from __future__ import annotations

# -- WebRTC (POST /webrtc/offer and the data channel) ------------------------------------------
MAX_OFFER_BYTES = 256 * 1024  # an SDP offer is a few KB; ICE candidates add little
NO_MEDIA_TIMEOUT_S = 30.0  # as FastRTC: a connection that never gets media is dropped
MAX_CHANNEL_MESSAGE_BYTES = 64 * 1024
# Data-channel messages per connection: inputs and control messages, a few a second.
MAX_CHANNEL_MESSAGES_PER_S = 50.0
MAX_CHANNEL_MESSAGE_BURST = 200.0

# -- WebSocket and telephone (/websocket/offer, /telephone/handler) ----------------------------
MAX_MESSAGE_BYTES = 1 << 20  # a 1 MiB text frame is ~8 s of 8 kHz audio; more is abuse
START_TIMEOUT_S = 30.0  # a socket that never sends `start` is dropped
# 20 ms media frames are 50 messages a second; far above these a client is flooding.
MAX_MESSAGES_PER_S = 250.0
MAX_MESSAGE_BURST = 500.0
MAX_BYTES_PER_S = 2.0 * (1 << 20)
MAX_BYTES_BURST = 8.0 * (1 << 20)
MAX_SESSION_ID_CHARS = 256
