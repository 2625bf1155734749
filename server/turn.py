"""TURN credentials for `rtc_configuration` / `server_rtc_configuration`.

FastRTC's helpers, same names, parameters, defaults, environment variables and results:
`get_cloudflare_turn_credentials` (Cloudflare Calls TURN keys, or the FastRTC/Hugging Face
endpoint with an HF token), `get_hf_turn_credentials` (deprecated there, kept), and
`get_twilio_turn_credentials` (Twilio's Network Traversal `Tokens` resource, called over REST
with httpx: the `twilio` package is not needed). Each returns the provider's
RTCConfiguration-shaped dict.

Beyond FastRTC: `get_turn_rest_credentials` mints time-limited credentials for a self-hosted
TURN server (coturn's `use-auth-secret`, the "TURN REST API" shared-secret scheme), computed
locally with no request at all.

The providers' base URLs are module attributes (`CLOUDFLARE_API_URL`, ...) read at call time,
so tests point them at a loopback stand-in. Errors never include the caller's secrets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import httpx

__all__ = [
    "TurnCredentialsError",
    "get_cloudflare_turn_credentials",
    "get_cloudflare_turn_credentials_async",
    "get_hf_turn_credentials",
    "get_hf_turn_credentials_async",
    "get_turn_credentials",
    "get_turn_credentials_async",
    "get_turn_rest_credentials",
    "get_twilio_turn_credentials",
]

# FastRTC's names for the first; the others were literals inside its functions.
CLOUDFLARE_FASTRTC_TURN_URL = "https://turn.fastrtc.org/credentials"
CLOUDFLARE_API_URL = "https://rtc.live.cloudflare.com/v1"
TWILIO_API_URL = "https://api.twilio.com/2010-04-01"

TIMEOUT_S = 10.0  # a page load or an offer waits on this call: fail rather than hang
_EXCERPT = 300  # characters of a provider's error body kept in the exception


class TurnCredentialsError(Exception):
    """A provider refused or failed a credentials request. `status` is the HTTP status (None
    when the provider could not be reached or answered something other than JSON); `body`
    an excerpt of its answer, with the caller's secrets masked. FastRTC raises a plain
    `Exception` here, which this subclasses."""

    def __init__(self, provider: str, status: int | None, body: str, detail: str = "") -> None:
        self.provider = provider
        self.status = status
        self.body = body
        what = f"HTTP {status}" if status is not None else detail
        super().__init__(f"Failed to get TURN credentials from {provider}: {what}" + (f": {body}" if body else ""))


def _mask(text: str, secrets: Sequence[str | None]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def _excerpt(response: httpx.Response, secrets: Sequence[str | None]) -> str:
    return _mask(response.text, secrets)[:_EXCERPT]  # masked before the cut: no half secret left


def _result(provider: str, response: httpx.Response, secrets: Sequence[str | None]) -> dict[str, Any]:
    if not response.is_success:
        raise TurnCredentialsError(provider, response.status_code, _excerpt(response, secrets))
    try:
        data = response.json()
    except ValueError:
        body = _excerpt(response, secrets)
        raise TurnCredentialsError(provider, None, body, detail=f"HTTP {response.status_code}, not JSON") from None
    if not isinstance(data, dict):
        raise TurnCredentialsError(provider, None, "", detail=f"expected a JSON object, got {type(data).__name__}")
    return data


def _unreachable(provider: str, e: httpx.HTTPError) -> TurnCredentialsError:
    # httpx's messages name the URL and the cause, never request headers (where tokens go).
    return TurnCredentialsError(provider, None, "", detail=f"could not reach it: {type(e).__name__}: {e}")


def _env(name: str) -> str | None:
    return (os.environ.get(name) or "").strip() or None


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


# -- Hugging Face / FastRTC endpoint ---------------------------------------------------------

def _hf_token(token: str | None, fn: str) -> str:
    token = token or _env("HF_TOKEN")
    if not token:
        raise ValueError(f"HF_TOKEN environment variable must be set or token must be provided to use {fn}")
    return token


def get_hf_turn_credentials(token: str | None = None, ttl: int = 600) -> dict[str, Any]:
    """TURN credentials from the FastRTC/Hugging Face endpoint (deprecated in FastRTC in
    favour of `get_cloudflare_turn_credentials`). `token` defaults to `HF_TOKEN`.

    Raises ValueError without a token, `TurnCredentialsError` when the request fails."""
    warnings.warn("get_hf_turn_credentials is deprecated. Use get_cloudflare_turn_credentials instead.",
                  UserWarning, stacklevel=2)
    token = _hf_token(token, "get_hf_turn_credentials")
    try:
        r = httpx.get(CLOUDFLARE_FASTRTC_TURN_URL, headers=_bearer(token), params={"ttl": ttl}, timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        raise _unreachable("Hugging Face", e) from None
    return _result("Hugging Face", r, [token])


async def get_hf_turn_credentials_async(
    token: str | None = None, ttl: int = 600, client: httpx.AsyncClient | None = None
) -> dict[str, Any]:
    """`get_hf_turn_credentials` on an `httpx.AsyncClient` (`client`, or one made for the call)."""
    warnings.warn("get_hf_turn_credentials_async is deprecated. Use get_cloudflare_turn_credentials_async instead.",
                  UserWarning, stacklevel=2)
    token = _hf_token(token, "get_hf_turn_credentials")
    return await _get_async("Hugging Face", client, CLOUDFLARE_FASTRTC_TURN_URL, token, ttl)


async def _get_async(provider: str, client: httpx.AsyncClient | None, url: str, token: str, ttl: int) -> dict[str, Any]:
    try:
        if client is not None:
            r = await client.get(url, headers=_bearer(token), params={"ttl": ttl}, timeout=TIMEOUT_S)
        else:
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as own:
                r = await own.get(url, headers=_bearer(token), params={"ttl": ttl})
    except httpx.HTTPError as e:
        raise _unreachable(provider, e) from None
    return _result(provider, r, [token])


# -- Cloudflare Calls TURN keys --------------------------------------------------------------

def _cloudflare_keys(turn_key_id: str | None, turn_key_api_token: str | None, fn: str) -> tuple[str, str]:
    key_id = turn_key_id or _env("CLOUDFLARE_TURN_KEY_ID")
    api_token = turn_key_api_token or _env("CLOUDFLARE_TURN_KEY_API_TOKEN")
    if not key_id or not api_token:
        missing = [n for n, v in (("CLOUDFLARE_TURN_KEY_ID", key_id), ("CLOUDFLARE_TURN_KEY_API_TOKEN", api_token)) if not v]
        raise ValueError(
            f"HF_TOKEN or CLOUDFLARE_TURN_KEY_ID and CLOUDFLARE_TURN_KEY_API_TOKEN must be set to use {fn} "
            f"(missing: {', '.join(missing)}; or pass turn_key_id/turn_key_api_token or hf_token)"
        )
    return key_id, api_token


def _cloudflare_url(key_id: str) -> str:
    return f"{CLOUDFLARE_API_URL}/turn/keys/{key_id}/credentials/generate-ice-servers"


def get_cloudflare_turn_credentials(
    turn_key_id: str | None = None,
    turn_key_api_token: str | None = None,
    hf_token: str | None = None,
    ttl: int = 600,
) -> dict[str, Any]:
    """TURN credentials from Cloudflare: `{"iceServers": [...]}`, valid for `ttl` seconds.

    As in FastRTC, an HF token (`hf_token`, else `HF_TOKEN`) takes precedence and uses the
    FastRTC/Hugging Face endpoint (Cloudflare's TURN with Hugging Face's quota); otherwise a
    Cloudflare TURN key (`turn_key_id` / `turn_key_api_token`, else `CLOUDFLARE_TURN_KEY_ID`
    / `CLOUDFLARE_TURN_KEY_API_TOKEN`) calls Cloudflare's `generate-ice-servers`.

    Raises ValueError without credentials, `TurnCredentialsError` when the request fails."""
    hf_token = hf_token or _env("HF_TOKEN")
    if hf_token:
        try:
            r = httpx.get(CLOUDFLARE_FASTRTC_TURN_URL, headers=_bearer(hf_token), params={"ttl": ttl}, timeout=TIMEOUT_S)
        except httpx.HTTPError as e:
            raise _unreachable("Hugging Face", e) from None
        return _result("Hugging Face", r, [hf_token])
    key_id, api_token = _cloudflare_keys(turn_key_id, turn_key_api_token, "get_cloudflare_turn_credentials")
    try:
        r = httpx.post(_cloudflare_url(key_id), headers=_bearer(api_token), json={"ttl": ttl}, timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        raise _unreachable("Cloudflare", e) from None
    return _result("Cloudflare", r, [api_token])


async def get_cloudflare_turn_credentials_async(
    turn_key_id: str | None = None,
    turn_key_api_token: str | None = None,
    hf_token: str | None = None,
    ttl: int = 600,
    client: httpx.AsyncClient | None = None,
) -> dict[str, Any]:
    """`get_cloudflare_turn_credentials` on an `httpx.AsyncClient` (`client`, or one made for
    the call). Suits `Stream(rtc_configuration=...)` as an async callable: fresh credentials
    for every connection."""
    hf_token = hf_token or _env("HF_TOKEN")
    if hf_token:
        return await _get_async("Hugging Face", client, CLOUDFLARE_FASTRTC_TURN_URL, hf_token, ttl)
    key_id, api_token = _cloudflare_keys(turn_key_id, turn_key_api_token, "get_cloudflare_turn_credentials_async")
    try:
        if client is not None:
            r = await client.post(_cloudflare_url(key_id), headers=_bearer(api_token), json={"ttl": ttl}, timeout=TIMEOUT_S)
        else:
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as own:
                r = await own.post(_cloudflare_url(key_id), headers=_bearer(api_token), json={"ttl": ttl})
    except httpx.HTTPError as e:
        raise _unreachable("Cloudflare", e) from None
    return _result("Cloudflare", r, [api_token])


# -- Twilio Network Traversal Service --------------------------------------------------------

def get_twilio_turn_credentials(twilio_sid: str | None = None, twilio_token: str | None = None) -> dict[str, Any]:
    """TURN credentials from Twilio: `{"iceServers": [...], "iceTransportPolicy": "relay"}`
    (FastRTC's shape: Twilio's `ice_servers` list as Twilio returns it). `twilio_sid` /
    `twilio_token` default to `TWILIO_ACCOUNT_SID` / `TWILIO_AUTH_TOKEN`.

    Raises ValueError without credentials, `TurnCredentialsError` when the request fails
    (FastRTC: `TwilioRestException`)."""
    sid = twilio_sid or _env("TWILIO_ACCOUNT_SID")
    token = twilio_token or _env("TWILIO_AUTH_TOKEN")
    if not sid or not token:
        missing = [n for n, v in (("TWILIO_ACCOUNT_SID", sid), ("TWILIO_AUTH_TOKEN", token)) if not v]
        raise ValueError(
            f"TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set or twilio_sid and twilio_token provided "
            f"to use get_twilio_turn_credentials (missing: {', '.join(missing)})"
        )
    try:
        r = httpx.post(f"{TWILIO_API_URL}/Accounts/{sid}/Tokens.json", auth=(sid, token), timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        raise _unreachable("Twilio", e) from None
    data = _result("Twilio", r, [token])
    if not isinstance(data.get("ice_servers"), list):
        raise TurnCredentialsError("Twilio", None, "", detail="the answer has no 'ice_servers' list")
    return {"iceServers": data["ice_servers"], "iceTransportPolicy": "relay"}


# -- FastRTC's dispatchers -------------------------------------------------------------------

def _pick(kwargs: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in names}


def get_turn_credentials(method: Literal["hf", "twilio", "cloudflare"] = "cloudflare", **kwargs: Any) -> dict[str, Any]:
    """FastRTC's dispatcher: the `method` provider's helper with the keyword arguments it takes
    (others are ignored, as in FastRTC)."""
    if method == "hf":
        warnings.warn("Method 'hf' is deprecated. Use 'cloudflare' instead.", UserWarning, stacklevel=2)
        return get_hf_turn_credentials(**_pick(kwargs, ("token", "ttl")))
    if method == "cloudflare":
        return get_cloudflare_turn_credentials(**_pick(kwargs, ("turn_key_id", "turn_key_api_token", "hf_token", "ttl")))
    if method == "twilio":
        return get_twilio_turn_credentials(**_pick(kwargs, ("twilio_sid", "twilio_token")))
    raise ValueError("Invalid method. Must be 'hf', 'twilio', or 'cloudflare'")


async def get_turn_credentials_async(
    method: Literal["hf", "twilio", "cloudflare"] = "cloudflare", **kwargs: Any
) -> dict[str, Any]:
    """FastRTC's async dispatcher. `"twilio"` raises NotImplementedError, as in FastRTC."""
    if method == "hf":
        warnings.warn("Method 'hf' is deprecated. Use 'cloudflare' instead.", UserWarning, stacklevel=2)
        return await get_hf_turn_credentials_async(**_pick(kwargs, ("token", "ttl", "client")))
    if method == "cloudflare":
        return await get_cloudflare_turn_credentials_async(
            **_pick(kwargs, ("turn_key_id", "turn_key_api_token", "hf_token", "ttl", "client"))
        )
    if method == "twilio":
        raise NotImplementedError("Async retrieval for Twilio credentials is not implemented.")
    raise ValueError("Invalid method. Must be 'hf', 'twilio', or 'cloudflare'")


# -- self-hosted TURN: the shared-secret ("TURN REST API") scheme ----------------------------

def turn_rest_password(secret: str, username: str) -> str:
    """coturn's `use-auth-secret` password for `username`: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def get_turn_rest_credentials(
    secret: str | None = None,
    urls: str | Sequence[str] | None = None,
    ttl: int = 86400,
    username: str = "batchrtc",
    *,
    relay_only: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """Time-limited credentials for your own TURN server (coturn with `use-auth-secret` and
    `static-auth-secret=<secret>`), computed here without any request.

    The username is `"<expiry unix time>:<username>"` and the credential
    base64(HMAC-SHA1(secret, that username)); the TURN server recomputes it from the shared
    secret and refuses it after the expiry. `secret` defaults to `BATCHRTC_TURN_SECRET`,
    `urls` (e.g. `"turn:turn.example.org:3478"`, or several) to `BATCHRTC_TURN_URLS`
    (comma-separated). `relay_only` adds `"iceTransportPolicy": "relay"`; `now` (unix
    seconds) replaces the clock, for tests.

    Returns `{"iceServers": [{"urls": [...], "username": ..., "credential": ...}]}`, usable as
    `Stream(rtc_configuration=...)` and `server_rtc_configuration=...`. Credentials expire:
    pass the function itself (e.g. `functools.partial(get_turn_rest_credentials, ...)`) so
    each connection gets fresh ones."""
    secret = secret or _env("BATCHRTC_TURN_SECRET")
    if not secret:
        raise ValueError("BATCHRTC_TURN_SECRET environment variable must be set or secret must be provided "
                         "to use get_turn_rest_credentials (coturn's static-auth-secret)")
    if urls is None:
        urls = [u.strip() for u in (_env("BATCHRTC_TURN_URLS") or "").split(",") if u.strip()]
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise ValueError("BATCHRTC_TURN_URLS environment variable must be set or urls must be provided "
                         "to use get_turn_rest_credentials (e.g. 'turn:turn.example.org:3478')")
    bad = [u for u in url_list if not isinstance(u, str) or not u.startswith(("turn:", "turns:"))]
    if bad:
        raise ValueError(f"TURN urls must start with 'turn:' or 'turns:', got {bad[0]!r}")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    if ":" in username:
        raise ValueError(f"username must not contain ':' (it separates the expiry), got {username!r}")
    expiry = int(time.time() if now is None else now) + ttl
    user = f"{expiry}:{username}"
    config: dict[str, Any] = {
        "iceServers": [{"urls": url_list, "username": user, "credential": turn_rest_password(secret, user)}]
    }
    if relay_only:
        config["iceTransportPolicy"] = "relay"
    return config
