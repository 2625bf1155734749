"""RTCConfiguration dicts (the browser's shape) checked and turned into aiortc's.

`server_rtc_configuration` takes the same dict a browser takes (`{"iceServers": [{"urls",
"username", "credential"}], "iceTransportPolicy"}`) or a callable returning one, called for
each offer so time-limited TURN credentials (`server.turn`) never go stale in a long-running
server. A dict is checked when the `Stream` is built, so a typo fails at start, not at every
offer.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from .executors import config_executor

POLICIES = {p.value: p for p in RTCIceTransportPolicy}  # "all", "relay"
# How long a connection waits for an app's `rtc_configuration` / `server_rtc_configuration`
# callable (a TURN provider's API that hangs must not hang the offer or the page).
RTC_CONFIG_TIMEOUT_S = 10.0


async def call_rtc_configuration(fn: Callable[[], Any], timeout_s: float | None = None) -> Any:
    """What an app's configuration callable returns (sync or async, no arguments). A sync one
    runs on `config_executor()`'s threads, so one that hangs never holds the default
    executor's. Raises TimeoutError after `timeout_s` (default RTC_CONFIG_TIMEOUT_S)."""

    async def call() -> Any:
        if inspect.iscoroutinefunction(fn):
            value = fn()
        else:
            value = await asyncio.get_running_loop().run_in_executor(config_executor(), fn)
        if inspect.isawaitable(value):
            value = await value
        return value

    limit = RTC_CONFIG_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        return await asyncio.wait_for(call(), limit)
    except asyncio.TimeoutError:
        raise TimeoutError(f"no answer within {limit:g} s") from None


def _server(i: int, entry: Any) -> RTCIceServer:
    where = f"server_rtc_configuration['iceServers'][{i}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a dict with 'urls', got {type(entry).__name__}")
    urls = entry.get("urls", entry.get("url"))  # Twilio's answers still carry the legacy "url"
    url_list = [urls] if isinstance(urls, str) else urls
    if not isinstance(url_list, list) or not url_list or not all(isinstance(u, str) for u in url_list):
        raise ValueError(f"{where}['urls'] must be a URL string or a non-empty list of them, got {urls!r}")
    for u in url_list:
        if not u.startswith(("stun:", "stuns:", "turn:", "turns:")):
            raise ValueError(f"{where}: ICE server URLs start with stun:, stuns:, turn: or turns:, got {u!r}")
    username, credential = entry.get("username"), entry.get("credential")
    for name, value in (("username", username), ("credential", credential)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}['{name}'] must be a string, got {type(value).__name__}")
    if any(u.startswith(("turn:", "turns:")) for u in url_list) and (not username or not credential):
        raise ValueError(f"{where}: a TURN server needs 'username' and 'credential'")
    return RTCIceServer(urls=urls, username=username, credential=credential)


def aiortc_configuration(config: Mapping[str, Any] | None) -> RTCConfiguration:
    """aiortc's configuration for a browser-shaped dict; ValueError saying what is wrong.

    Without one, no STUN server at all (aiortc would otherwise contact a public STUN server).
    `iceTransportPolicy: "relay"` is honoured (FastRTC drops it on the server side): the
    server then offers only TURN relay candidates. aiortc uses the first STUN and the first
    TURN URL it supports (`turn:` over UDP or TCP, `turns:` over TCP) and ignores the rest."""
    if config is None:
        return RTCConfiguration(iceServers=[])
    if not isinstance(config, Mapping):
        raise ValueError(f"server_rtc_configuration must be a dict or a callable returning one, got {type(config).__name__}")
    entries = config.get("iceServers") or []
    if not isinstance(entries, list):
        raise ValueError(f"server_rtc_configuration['iceServers'] must be a list, got {type(entries).__name__}")
    policy = config.get("iceTransportPolicy", "all")
    if policy not in POLICIES:
        raise ValueError(f"server_rtc_configuration['iceTransportPolicy'] must be 'all' or 'relay', got {policy!r}")
    servers = [_server(i, e) for i, e in enumerate(entries)]
    if policy == "relay" and not any(
        u.startswith(("turn:", "turns:")) for s in servers for u in ([s.urls] if isinstance(s.urls, str) else s.urls)
    ):
        raise ValueError("server_rtc_configuration: iceTransportPolicy 'relay' needs a TURN server in 'iceServers'")
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=POLICIES[policy])
