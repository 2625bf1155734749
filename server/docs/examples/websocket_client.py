"""FastRTC WebSocket client: stream a WAV file to the server, save the audio it answers.

    pip install websockets numpy scipy
    python ws_client.py speech.wav [URL]
"""
import asyncio
import base64
import json
import sys
import time
import uuid
import wave  # noqa: F401 - used by load_wav

import numpy as np
import websockets
from scipy.signal import resample_poly  # noqa: F401 - used by load_wav

from ._audio import load_wav, ulaw_decode, ulaw_encode  # inlined on the docs page

URL = "ws://127.0.0.1:8000/websocket/offer"
INPUT_RATE = 48000  # Hz of the mu-law samples the server expects
OUTPUT_RATE = 24000  # Hz of the mu-law samples the server sends back
FRAME_MS = 20


async def main(url, wav_path, out_path=None):
    pcm = load_wav(wav_path, INPUT_RATE)
    # Trailing silence: a ReplyOnPause server answers once it hears a pause.
    pcm = np.concatenate([pcm, np.zeros(2 * INPUT_RATE, dtype=np.int16)])
    reply, messages = [], []
    play_end = [0.0]  # when the reply received so far will have played out

    async with websockets.connect(url, max_size=None) as ws:
        # 1. start (once), with an id of your choosing
        await ws.send(json.dumps({"event": "start", "websocket_id": str(uuid.uuid4())}))

        async def receive():
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("event") == "media":  # reply audio, mu-law at OUTPUT_RATE
                        pcm_out = ulaw_decode(base64.b64decode(msg["media"]["payload"]))
                        reply.append(pcm_out)
                        now = time.monotonic()
                        play_end[0] = max(play_end[0], now) + len(pcm_out) / OUTPUT_RATE
                    else:  # {"type": "log" | "error" | ...}, {"event": "pong"} or a refusal
                        messages.append(msg)
                        print("server:", msg)
            except websockets.ConnectionClosed as e:
                print("closed:", e)

        reader = asyncio.create_task(receive())
        # 2. media: 20 ms of mu-law at INPUT_RATE per message, at real-time pace
        step = INPUT_RATE * FRAME_MS // 1000
        t0 = time.monotonic()
        for i, start in enumerate(range(0, len(pcm), step)):
            await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.monotonic()))
            if reader.done():
                break  # the server closed the socket (refusal, time limit, end of stream)
            payload = base64.b64encode(ulaw_encode(pcm[start:start + step])).decode("ascii")
            await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
        # 3. listen until the reply has played out, then stop
        deadline = time.monotonic() + 30
        while not reader.done() and time.monotonic() < deadline:
            if time.monotonic() > max(play_end[0], t0) + 1.5:
                break
            await asyncio.sleep(0.1)
        if not reader.done():
            await ws.send(json.dumps({"event": "stop"}))
        await asyncio.wait_for(reader, 10)

    audio = np.concatenate(reply) if reply else np.zeros(0, dtype=np.int16)
    if out_path:
        with wave.open(out_path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(OUTPUT_RATE)
            w.writeframes(audio.tobytes())
    return {"reply": audio, "rate": OUTPUT_RATE, "messages": messages}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    result = asyncio.run(main(sys.argv[2] if len(sys.argv) > 2 else URL, sys.argv[1], "reply.wav"))
    print(f"{len(result['reply']) / OUTPUT_RATE:.2f} s of reply audio -> reply.wav")
