"""The front ends: each a router module that receives the session registry and the stream's
configuration, never the `Stream` and never another front end.

- `webrtc/`: FastRTC's `POST /webrtc/offer` (aiortc), audio, video and the data channel;
- `websocket.py`: `WS /websocket/offer`, audio as JSON messages;
- `telephone.py`: `POST /telephone/incoming` (TwiML) and `WS /telephone/handler` (Twilio);
- `media_socket.py`: the WebSocket audio protocol the last two share.
"""
