"""A simulated phone call in Twilio's Media Streams format: the provider's webhook, then
the call's audio (8 kHz mu-law, 20 ms per message) over the WebSocket the TwiML names.

    pip install httpx websockets numpy scipy
    python phone_call.py speech.wav [BASE_URL]
"""
import asyncio
import base64
import json
import sys
import time
import uuid
import wave  # noqa: F401 - used by load_wav
from xml.etree import ElementTree

import httpx
import numpy as np
import websockets
from scipy.signal import resample_poly  # noqa: F401 - used by load_wav

from ._audio import load_wav, ulaw_decode, ulaw_encode  # inlined on the docs page

BASE_URL = "http://127.0.0.1:8000"  # the webhook is BASE_URL + "/telephone/incoming"
RATE = 8000  # phone audio both ways: 8 kHz mu-law
FRAME = 160  # samples per media message (20 ms)


async def main(base_url, wav_path):
    call_sid = "CA" + uuid.uuid4().hex
    stream_sid = "MZ" + uuid.uuid4().hex
    # 1. The number rings: the provider POSTs its voice webhook and gets TwiML back.
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            base_url + "/telephone/incoming",
            data={"CallSid": call_sid, "From": "+15005550006", "To": "+15005550001"},
        )
    r.raise_for_status()
    stream_url = ElementTree.fromstring(r.text).find("./Connect/Stream").get("url")

    # 2. The provider opens the media stream the TwiML names and speaks its protocol.
    pcm = np.concatenate([load_wav(wav_path, RATE), np.zeros(2 * RATE, dtype=np.int16)])
    reply, messages, clears, sids = [], [], [], set()
    play_end = [0.0]
    seq = iter(range(1, 1 << 30))
    async with websockets.connect(stream_url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({
            "event": "start", "sequenceNumber": str(next(seq)), "streamSid": stream_sid,
            "start": {
                "streamSid": stream_sid, "callSid": call_sid, "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
                "customParameters": {},
            },
        }))

        async def receive():
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("event") == "media":  # what the caller hears
                        sids.add(msg.get("streamSid"))
                        pcm_out = ulaw_decode(base64.b64decode(msg["media"]["payload"]))
                        reply.append(pcm_out)
                        now = time.monotonic()
                        play_end[0] = max(play_end[0], now) + len(pcm_out) / RATE
                    elif msg.get("event") == "clear":  # the caller interrupted: drop unplayed audio
                        clears.append(msg)
                        play_end[0] = time.monotonic()
                    else:  # {"type": "log" | "error" | ...} or a refusal
                        messages.append(msg)
                        print("server:", msg)
            except websockets.ConnectionClosed as e:
                print("closed:", e)

        reader = asyncio.create_task(receive())
        t0 = time.monotonic()
        for i, start in enumerate(range(0, len(pcm), FRAME)):
            await asyncio.sleep(max(0.0, t0 + i * 0.02 - time.monotonic()))
            if reader.done():
                break
            await ws.send(json.dumps({
                "event": "media", "sequenceNumber": str(next(seq)), "streamSid": stream_sid,
                "media": {
                    "track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20),
                    "payload": base64.b64encode(ulaw_encode(pcm[start:start + FRAME])).decode("ascii"),
                },
            }))
            if i == 50:  # Twilio reports played-out marks like this; the server ignores them
                await ws.send(json.dumps({"event": "mark", "sequenceNumber": str(next(seq)),
                                          "streamSid": stream_sid, "mark": {"name": "one-second"}}))
        deadline = time.monotonic() + 30
        while not reader.done() and time.monotonic() < deadline:
            if time.monotonic() > max(play_end[0], t0) + 1.5:
                break
            await asyncio.sleep(0.1)
        if not reader.done():  # hang up
            await ws.send(json.dumps({
                "event": "stop", "sequenceNumber": str(next(seq)), "streamSid": stream_sid,
                "stop": {"callSid": call_sid},
            }))
        await asyncio.wait_for(reader, 10)

    audio = np.concatenate(reply) if reply else np.zeros(0, dtype=np.int16)
    return {"twiml": r.text, "stream_url": stream_url, "reply": audio, "rate": RATE,
            "stream_sids": sids, "stream_sid": stream_sid, "clears": clears, "messages": messages}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    result = asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else BASE_URL))
    print(f"{len(result['reply']) / RATE:.2f} s of reply audio, {len(result['clears'])} clear(s)")
