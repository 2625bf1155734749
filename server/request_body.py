"""Request bodies read with a size cap, before anything parses them.

FastAPI reads a whole body into memory before validating it, however large. Routes that take
client JSON read it here instead: a declared `Content-Length` over the cap is refused with 413
before a byte is read, and a chunked body is refused as soon as it passes the cap.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request

from .utils import parse_json_message


async def read_capped(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, detail="invalid Content-Length") from None
        if size > max_bytes:
            raise HTTPException(413, detail=f"request body too large ({size} bytes > {max_bytes})")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise HTTPException(413, detail=f"request body too large (> {max_bytes} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON: 413 past `max_bytes`, 400 when it is not JSON."""
    body = await read_capped(request, max_bytes)
    try:
        return parse_json_message(body, max_bytes)
    except ValueError as e:
        raise HTTPException(400, detail=f"request body: {e}") from None
