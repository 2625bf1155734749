"""The default app: `uvicorn server.app:stream`.

Face detection on every session's webcam video, batched across sessions on one GPU (CPU
when there is none): a confidence slider (`additional_inputs`) and a detection list
(`additional_outputs`). The audio ReplyOnPause echo is `uvicorn server.echo_app:stream`.
`BATCHRTC_CONCURRENCY` sets how many sessions it accepts (default 64).
"""

from __future__ import annotations


import gradio as gr
from fastapi.responses import HTMLResponse

from .detection import face_detection_handler
from .config import load_settings
from .stream import Stream

stream = Stream(
    face_detection_handler(),
    modality="video",
    mode="send-receive",
    additional_inputs=[gr.Slider(0.0, 1.0, value=0.9, step=0.01, label="Confidence threshold")],
    additional_outputs=[gr.JSON(label="Detections")],
    additional_outputs_handler=lambda old, new: new,
    concurrency_limit=load_settings().concurrency or 64,
    ui_args={
        "title": "Batched face detection",
        "subtitle": "Press Start and allow the camera: faces get boxes, their scores appear "
        "on the right. The slider sets the confidence threshold.",
    },
)


@stream.get("/", response_class=HTMLResponse)
async def index() -> str:
    return (
        "<h1>batchrtc: batched face detection</h1>"
        '<p>Open <a href="/ui">/ui</a> to try it with your webcam. Clients connect with '
        'FastRTC\'s <code>POST /webrtc/offer</code> (<a href="/webrtc/docs">docs</a>).</p>'
        f"<p>{stream.active_sessions} active session(s).</p>"
    )
