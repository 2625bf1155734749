"""Apps the engine-process tests serve with `uvicorn --workers 2` (real processes).

`video`: a batched video handler (inverts frames) the engine imports by name.
`echo`: a ReplyOnPause echo whose replies also carry the session's latest `set_input` value as
`AdditionalOutputs`, plus routes that say which worker answered, so a test can tell whether
a request for a session landed on the worker that holds it.
"""

from __future__ import annotations

import json
import os

import torch
from fastapi.responses import StreamingResponse

from server import AdditionalOutputs, ReplyOnPause, Stream
from server.config import load_settings
from server.video import batched


class _Input:
    """An additional input without Gradio: what `Stream` reads is `.value`."""

    def __init__(self, value: str) -> None:
        self.value = value


def tagged_echo(audio, tag):
    sr, samples = audio
    yield AdditionalOutputs(tag)
    yield sr, samples


echo = Stream(
    ReplyOnPause(tagged_echo),
    modality="audio",
    mode="send-receive",
    concurrency_limit=load_settings().concurrency or 64,
    additional_inputs=[_Input("untagged")],
    additional_outputs=[_Input("")],
    additional_outputs_handler=lambda old, new: new,
)


@echo.post("/tag/{webrtc_id}")
async def set_tag(webrtc_id: str, value: str) -> dict:
    echo.set_input(webrtc_id, value)
    return {"pid": os.getpid()}


@echo.get("/owner/{webrtc_id}")
async def owner(webrtc_id: str) -> dict:
    return {"pid": os.getpid(), "here": webrtc_id in echo.sessions}


@echo.get("/outputs/{webrtc_id}")
async def outputs(webrtc_id: str) -> StreamingResponse:
    source = echo.output_stream(webrtc_id)

    async def events():
        yield f"event: worker\ndata: {os.getpid()}\n\n"
        async for out in source:
            yield f"data: {json.dumps(list(out.args))}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@batched(max_batch_size=16, max_queue_delay_ms=15, device="cpu")
def invert_batch(frames: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """A batched handler the engine process imports by name: inverts every frame."""
    return 255 - frames


video = Stream(invert_batch, modality="video", mode="send-receive", concurrency_limit=16)


@video.middleware("http")
async def say_which_worker(request, call_next):
    response = await call_next(request)
    response.headers["x-worker-pid"] = str(os.getpid())
    return response


@video.get("/owner/{webrtc_id}")
async def video_owner(webrtc_id: str) -> dict:
    return {"pid": os.getpid(), "here": webrtc_id in video.sessions}


@batched(max_batch_size=4, max_queue_delay_ms=1, device="cpu")
def times_out(frames: torch.Tensor, args: list[tuple]) -> list:
    """Fails every batch with a TimeoutError of its own (as a dropped late frame does)."""
    raise TimeoutError("this handler's own timeout")
