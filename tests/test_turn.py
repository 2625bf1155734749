"""TURN credentials (`server.turn`) and relay-only WebRTC through a real coturn.

The provider helpers call loopback stand-ins of Cloudflare's, the FastRTC/Hugging Face and
Twilio's credential APIs (real uvicorn servers) that check method, path and auth the way the
real APIs do and answer in their JSON shapes. The self-hosted helper's credentials are
checked against `openssl` and against a real `turnserver`, through which a real aiortc client
and a real Stream then connect with relay candidates only.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint
from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

import server.turn as turn
from benchmarks.harness import ServerThread
from server import (
    Stream,
    TurnCredentialsError,
    get_cloudflare_turn_credentials,
    get_cloudflare_turn_credentials_async,
    get_hf_turn_credentials,
    get_hf_turn_credentials_async,
    get_turn_credentials,
    get_turn_credentials_async,
    get_turn_rest_credentials,
    get_twilio_turn_credentials,
)
from server.ice_servers import aiortc_configuration
from tests.test_fastrtc_compat import Echo  # sends back every audio frame it receives
from tests.turn_server import REALM, TurnServer, run_turnserver
from tests.waiting import wait_for
from tests.webrtc_client import AudioSource, connect

CF_KEY_ID, CF_TOKEN = "0123456789abcdef0123456789abcdef", "cf-api-token-secret"
HF_TOKEN = "hf_secret_token"
TW_SID, TW_TOKEN = "AC" + "0" * 32, "twilio-auth-token-secret"
ENV = ("HF_TOKEN", "CLOUDFLARE_TURN_KEY_ID", "CLOUDFLARE_TURN_KEY_API_TOKEN", "TWILIO_ACCOUNT_SID",
       "TWILIO_AUTH_TOKEN", "BATCHRTC_TURN_SECRET", "BATCHRTC_TURN_URLS")


# -- stand-ins for the providers' APIs --------------------------------------------------------

def cloudflare_ice(ttl: int) -> dict[str, Any]:
    """Cloudflare's `generate-ice-servers` answer shape."""
    return {"iceServers": [
        {"urls": ["stun:stun.cloudflare.com:3478", "stun:stun.cloudflare.com:53"]},
        {"urls": ["turn:turn.cloudflare.com:3478?transport=udp", "turn:turn.cloudflare.com:3478?transport=tcp",
                  "turns:turn.cloudflare.com:5349?transport=tcp"],
         "username": f"user-ttl-{ttl}", "credential": f"cred-ttl-{ttl}"},
    ]}


def twilio_token(sid: str) -> dict[str, Any]:
    """Twilio's `Tokens.json` answer shape (legacy `url` beside `urls`, as Twilio sends)."""
    return {
        "account_sid": sid, "date_created": "Mon, 30 Nov 2026 14:00:00 +0000",
        "date_updated": "Mon, 30 Nov 2026 14:00:00 +0000", "ttl": "86400",
        "username": "tw-user", "password": "tw-pass",
        "ice_servers": [
            {"url": "stun:global.stun.twilio.com:3478", "urls": "stun:global.stun.twilio.com:3478"},
            {"url": "turn:global.turn.twilio.com:3478?transport=udp", "urls": "turn:global.turn.twilio.com:3478?transport=udp",
             "username": "tw-user", "credential": "tw-pass"},
        ],
    }


def provider_app(calls: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    def bearer(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    @app.post("/v1/turn/keys/{key_id}/credentials/generate-ice-servers")
    async def cloudflare(key_id: str, request: Request) -> JSONResponse:
        body = await request.json()
        calls.append({"api": "cloudflare", "key_id": key_id, "token": bearer(request), "body": body,
                      "content_type": request.headers.get("content-type")})
        if key_id == "padded":  # the token straddles the helper's 300-character excerpt
            return JSONResponse({"message": "x" * 270 + f" token={bearer(request)}"}, 403)
        if key_id != CF_KEY_ID:
            return JSONResponse({"success": False, "errors": [{"code": 10004, "message": "key not found"}]}, 404)
        if bearer(request) != CF_TOKEN:
            # echoes the token, so the test sees that the helper masks it
            return JSONResponse({"success": False, "errors": [{"message": f"bad token {bearer(request)}"}]}, 401)
        if not isinstance(body.get("ttl"), int):
            return JSONResponse({"success": False, "errors": [{"message": "ttl must be an integer"}]}, 400)
        return JSONResponse(cloudflare_ice(body["ttl"]), 201)

    @app.get("/credentials")
    async def hf(request: Request) -> JSONResponse:
        calls.append({"api": "hf", "token": bearer(request), "ttl": request.query_params.get("ttl")})
        if bearer(request) != HF_TOKEN:
            return JSONResponse({"error": "Invalid token"}, 401)
        return JSONResponse(cloudflare_ice(int(request.query_params["ttl"])))

    @app.post("/2010-04-01/Accounts/{sid}/Tokens.json")
    async def twilio(sid: str, request: Request) -> JSONResponse:
        auth = request.headers.get("authorization", "")
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":") if auth.startswith("Basic ") else ("", "", "")
        calls.append({"api": "twilio", "sid": sid, "user": user, "password": password})
        if user != sid or (sid, password) != (TW_SID, TW_TOKEN):
            return JSONResponse({"code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003",
                                 "status": 401}, 401)
        return JSONResponse(twilio_token(sid), 201)

    @app.get("/not-json")
    async def not_json() -> HTMLResponse:  # e.g. a proxy's or captive portal's page
        return HTMLResponse("<html><body>Sign in to the network</body></html>")

    @app.get("/json-list")
    async def json_list() -> JSONResponse:
        return JSONResponse([])

    return app


@pytest.fixture(scope="module")
def provider() -> Iterator[ServerThread]:
    calls: list[dict[str, Any]] = []
    s = ServerThread(provider_app(calls)).start()
    s.calls = calls  # type: ignore[attr-defined]
    yield s
    s.stop()


@pytest.fixture
def api(provider, monkeypatch) -> list[dict[str, Any]]:
    """Point the helpers at the stand-in, with no provider variables in the environment."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(turn, "CLOUDFLARE_API_URL", f"{provider.http}/v1")
    monkeypatch.setattr(turn, "CLOUDFLARE_FASTRTC_TURN_URL", f"{provider.http}/credentials")
    monkeypatch.setattr(turn, "TWILIO_API_URL", f"{provider.http}/2010-04-01")
    provider.calls.clear()
    return provider.calls


# -- Cloudflare -------------------------------------------------------------------------------

def test_cloudflare_with_keys_posts_ttl_with_bearer_token(api):
    assert get_cloudflare_turn_credentials(CF_KEY_ID, CF_TOKEN) == cloudflare_ice(600)
    assert api == [{"api": "cloudflare", "key_id": CF_KEY_ID, "token": CF_TOKEN, "body": {"ttl": 600},
                    "content_type": "application/json"}]


def test_cloudflare_reads_its_keys_from_the_environment(api, monkeypatch):
    monkeypatch.setenv("CLOUDFLARE_TURN_KEY_ID", CF_KEY_ID)
    monkeypatch.setenv("CLOUDFLARE_TURN_KEY_API_TOKEN", CF_TOKEN)
    assert get_cloudflare_turn_credentials(ttl=3600) == cloudflare_ice(3600)
    assert api[0]["body"] == {"ttl": 3600}


def test_an_hf_token_takes_precedence_as_in_fastrtc(api, monkeypatch):
    assert get_cloudflare_turn_credentials(CF_KEY_ID, CF_TOKEN, hf_token=HF_TOKEN, ttl=120) == cloudflare_ice(120)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    assert get_cloudflare_turn_credentials(ttl=60) == cloudflare_ice(60)
    assert [(c["api"], c["token"], c["ttl"]) for c in api] == [("hf", HF_TOKEN, "120"), ("hf", HF_TOKEN, "60")]


async def test_cloudflare_async_with_and_without_a_client(api):
    assert await get_cloudflare_turn_credentials_async(CF_KEY_ID, CF_TOKEN, ttl=30) == cloudflare_ice(30)
    async with httpx.AsyncClient() as client:
        got = await get_cloudflare_turn_credentials_async(CF_KEY_ID, CF_TOKEN, ttl=31, client=client)
        assert not client.is_closed  # the caller's client is used, not closed
    assert got == cloudflare_ice(31)
    assert await get_cloudflare_turn_credentials_async(hf_token=HF_TOKEN) == cloudflare_ice(600)
    assert [c["api"] for c in api] == ["cloudflare", "cloudflare", "hf"]


async def test_cloudflare_without_credentials_names_the_variables(api):
    with pytest.raises(ValueError, match="CLOUDFLARE_TURN_KEY_ID and CLOUDFLARE_TURN_KEY_API_TOKEN"):
        get_cloudflare_turn_credentials()
    with pytest.raises(ValueError, match=r"missing: CLOUDFLARE_TURN_KEY_API_TOKEN"):
        await get_cloudflare_turn_credentials_async(turn_key_id=CF_KEY_ID)
    assert api == []  # nothing was sent


async def test_a_refused_request_says_status_and_body_but_not_the_secret(api):
    with pytest.raises(TurnCredentialsError) as e:
        get_cloudflare_turn_credentials(CF_KEY_ID, "wrong-" + CF_TOKEN)
    assert e.value.status == 401 and e.value.provider == "Cloudflare"
    assert "bad token" in str(e.value) and CF_TOKEN not in str(e.value) and "***" in e.value.body
    with pytest.raises(TurnCredentialsError, match="HTTP 403") as e:
        get_cloudflare_turn_credentials("padded", CF_TOKEN)
    assert CF_TOKEN[:8] not in str(e.value) and "token=***" in str(e.value)
    with pytest.raises(TurnCredentialsError, match="HTTP 404.*key not found"):
        await get_cloudflare_turn_credentials_async("unknown-key", CF_TOKEN)
    with pytest.raises(TurnCredentialsError, match="HTTP 400"):
        get_cloudflare_turn_credentials(CF_KEY_ID, CF_TOKEN, ttl="600")  # type: ignore[arg-type]
    with pytest.raises(TurnCredentialsError, match="HTTP 401") as e:
        get_cloudflare_turn_credentials(hf_token="hf_wrong")
    assert isinstance(e.value, Exception) and e.value.status == 401  # FastRTC raises Exception


def test_an_unreachable_provider_or_a_non_json_answer_is_a_clear_error(api, monkeypatch):
    monkeypatch.setattr(turn, "CLOUDFLARE_API_URL", "http://127.0.0.1:9/v1")  # discard port: refused
    with pytest.raises(TurnCredentialsError, match="could not reach it: ConnectError") as e:
        get_cloudflare_turn_credentials(CF_KEY_ID, CF_TOKEN)
    assert e.value.status is None and CF_TOKEN not in str(e.value)
    monkeypatch.setattr(turn, "CLOUDFLARE_FASTRTC_TURN_URL", turn.CLOUDFLARE_FASTRTC_TURN_URL.replace("/credentials", "/not-json"))
    with pytest.raises(TurnCredentialsError, match="HTTP 200, not JSON: <html>"):
        get_cloudflare_turn_credentials(hf_token=HF_TOKEN)
    monkeypatch.setattr(turn, "CLOUDFLARE_FASTRTC_TURN_URL", turn.CLOUDFLARE_FASTRTC_TURN_URL.replace("/not-json", "/json-list"))
    with pytest.raises(TurnCredentialsError, match="expected a JSON object, got list"):
        get_cloudflare_turn_credentials(hf_token=HF_TOKEN)


# -- Hugging Face (deprecated in FastRTC, kept) --------------------------------------------------

async def test_hf_helpers_warn_and_get_credentials(api, monkeypatch):
    with pytest.warns(UserWarning, match="deprecated"):
        assert get_hf_turn_credentials(HF_TOKEN, ttl=90) == cloudflare_ice(90)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    with pytest.warns(UserWarning, match="deprecated"):
        assert await get_hf_turn_credentials_async() == cloudflare_ice(600)
    assert [(c["token"], c["ttl"]) for c in api] == [(HF_TOKEN, "90"), (HF_TOKEN, "600")]


async def test_hf_without_a_token_names_hf_token(api):
    with warnings.catch_warnings(), pytest.raises(ValueError, match="HF_TOKEN"):
        warnings.simplefilter("ignore")
        get_hf_turn_credentials()
    with warnings.catch_warnings(), pytest.raises(ValueError, match="HF_TOKEN"):
        warnings.simplefilter("ignore")
        await get_hf_turn_credentials_async()


# -- Twilio -------------------------------------------------------------------------------------

def test_twilio_uses_basic_auth_and_returns_fastrtcs_shape(api):
    got = get_twilio_turn_credentials(TW_SID, TW_TOKEN)
    assert got == {"iceServers": twilio_token(TW_SID)["ice_servers"], "iceTransportPolicy": "relay"}
    assert api == [{"api": "twilio", "sid": TW_SID, "user": TW_SID, "password": TW_TOKEN}]
    # Twilio's answer is accepted by the server side as it is (legacy `url` key and all)
    assert aiortc_configuration(got).iceTransportPolicy == RTCIceTransportPolicy.RELAY


def test_twilio_reads_the_environment_and_names_what_is_missing(api, monkeypatch):
    with pytest.raises(ValueError, match="TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN"):
        get_twilio_turn_credentials()
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", TW_SID)
    with pytest.raises(ValueError, match="missing: TWILIO_AUTH_TOKEN"):
        get_twilio_turn_credentials()
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TW_TOKEN)
    assert get_twilio_turn_credentials()["iceServers"][1]["username"] == "tw-user"
    with pytest.raises(TurnCredentialsError, match="Twilio: HTTP 401.*Authenticate") as e:
        get_twilio_turn_credentials(TW_SID, "bad-token")
    assert "bad-token" not in str(e.value)


# -- FastRTC's dispatchers ------------------------------------------------------------------------

async def test_dispatchers_pass_each_provider_its_own_arguments(api):
    kw = dict(turn_key_id=CF_KEY_ID, turn_key_api_token=CF_TOKEN, twilio_sid=TW_SID, twilio_token=TW_TOKEN, ttl=45)
    assert get_turn_credentials(**kw) == cloudflare_ice(45)
    assert get_turn_credentials("twilio", **kw)["iceTransportPolicy"] == "relay"
    with pytest.warns(UserWarning):
        assert get_turn_credentials("hf", token=HF_TOKEN, ttl=46) == cloudflare_ice(46)
    assert await get_turn_credentials_async(**kw) == cloudflare_ice(45)
    with pytest.raises(NotImplementedError):
        await get_turn_credentials_async("twilio", **kw)
    with pytest.raises(ValueError, match="Invalid method"):
        get_turn_credentials("xirsys")  # type: ignore[arg-type]
    assert [c["api"] for c in api] == ["cloudflare", "twilio", "hf", "cloudflare"]


def test_signatures_are_fastrtcs():
    """FastRTC 0.0.34's `credentials.py` parameters and defaults, name for name."""
    import inspect

    expected = {
        get_cloudflare_turn_credentials: [("turn_key_id", None), ("turn_key_api_token", None), ("hf_token", None), ("ttl", 600)],
        get_cloudflare_turn_credentials_async: [("turn_key_id", None), ("turn_key_api_token", None), ("hf_token", None),
                                                ("ttl", 600), ("client", None)],
        get_hf_turn_credentials: [("token", None), ("ttl", 600)],
        get_hf_turn_credentials_async: [("token", None), ("ttl", 600), ("client", None)],
        get_twilio_turn_credentials: [("twilio_sid", None), ("twilio_token", None)],
        get_turn_credentials: [("method", "cloudflare"), ("kwargs", inspect.Parameter.empty)],
        get_turn_credentials_async: [("method", "cloudflare"), ("kwargs", inspect.Parameter.empty)],
    }
    for fn, params in expected.items():
        got = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
        assert got == params, fn.__name__
    assert inspect.iscoroutinefunction(get_cloudflare_turn_credentials_async)
    assert inspect.iscoroutinefunction(get_hf_turn_credentials_async)
    assert inspect.iscoroutinefunction(get_turn_credentials_async)


# -- self-hosted TURN: the shared-secret scheme ---------------------------------------------------

def test_turn_rest_credentials_shape_and_expiry():
    got = get_turn_rest_credentials("s3cret", "turn:turn.example.org:3478", ttl=600, username="alice", now=1_700_000_000)
    assert got == {"iceServers": [{"urls": ["turn:turn.example.org:3478"], "username": "1700000600:alice",
                                   "credential": got["iceServers"][0]["credential"]}]}
    relay = get_turn_rest_credentials("s3cret", ["turn:a:3478", "turns:a:5349?transport=tcp"], relay_only=True)
    assert relay["iceTransportPolicy"] == "relay" and len(relay["iceServers"][0]["urls"]) == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_turn_rest_credential_matches_openssls_hmac_sha1():
    got = get_turn_rest_credentials("s3cret", "turn:h:3478", ttl=600, username="alice", now=1_700_000_000)
    server = got["iceServers"][0]
    mac = subprocess.run(["openssl", "dgst", "-sha1", "-hmac", "s3cret", "-binary"], input=server["username"].encode(),
                         capture_output=True, check=True).stdout
    assert server["credential"] == base64.b64encode(mac).decode()


def test_turn_rest_reads_the_environment_and_rejects_bad_input(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="BATCHRTC_TURN_SECRET"):
        get_turn_rest_credentials(urls="turn:h:3478")
    monkeypatch.setenv("BATCHRTC_TURN_SECRET", "envsecret")
    with pytest.raises(ValueError, match="BATCHRTC_TURN_URLS"):
        get_turn_rest_credentials()
    monkeypatch.setenv("BATCHRTC_TURN_URLS", "turn:h:3478, turn:h:3478?transport=tcp")
    env = get_turn_rest_credentials(now=0)
    assert env["iceServers"][0]["urls"] == ["turn:h:3478", "turn:h:3478?transport=tcp"]
    assert env == get_turn_rest_credentials("envsecret", ["turn:h:3478", "turn:h:3478?transport=tcp"], now=0)
    with pytest.raises(ValueError, match="'turn:' or 'turns:'"):
        get_turn_rest_credentials(urls="stun:h:3478")
    with pytest.raises(ValueError, match="ttl"):
        get_turn_rest_credentials(ttl=0)
    with pytest.raises(ValueError, match="':'"):
        get_turn_rest_credentials(username="a:b")


# -- the server side accepts the browser's shape --------------------------------------------------

def test_server_rtc_configuration_dicts_are_checked_when_the_stream_is_built():
    cfg = aiortc_configuration(get_turn_rest_credentials("s", "turn:h:3478", relay_only=True))
    assert cfg.iceTransportPolicy == RTCIceTransportPolicy.RELAY
    assert cfg.iceServers[0].urls == ["turn:h:3478"] and cfg.iceServers[0].username.endswith(":batchrtc")
    assert aiortc_configuration(None).iceServers == []
    bad = [
        ({"iceServers": "turn:h"}, "must be a list"),
        ({"iceServers": [{"urls": []}]}, "non-empty list"),
        ({"iceServers": [{"urls": "http://h"}]}, "start with stun:"),
        ({"iceServers": [{"urls": "turn:h:3478"}]}, "needs 'username' and 'credential'"),
        ({"iceServers": [{"urls": "stun:h"}], "iceTransportPolicy": "relay"}, "needs a TURN server"),
        ({"iceServers": [], "iceTransportPolicy": "none"}, "'all' or 'relay'"),
        (["turn:h"], "must be a dict"),
    ]
    for config, message in bad:
        with pytest.raises(ValueError, match=message):
            Stream(Echo(), modality="audio", server_rtc_configuration=config)  # type: ignore[arg-type]


async def test_a_failing_server_rtc_configuration_callable_fails_only_that_offer(serve):
    def broken() -> dict:
        raise RuntimeError("provider down")

    stream = Stream(Echo(), modality="audio", concurrency_limit=2, server_rtc_configuration=broken)
    server = serve(stream)
    client, answer = await connect(server.http, "broken", audio=AudioSource(tone()), recv_audio=True)
    await client.close()
    assert answer["_status"] == 500 and answer["meta"]["error"] == "negotiation_failed"
    assert "provider down" in answer["meta"]["detail"]
    assert stream.active_sessions == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_server_rtc_configuration_callable_that_never_answers_fails_only_that_offer(serve, monkeypatch, kind):
    # A provider's API that hangs: the offer fails with a clear error after the timeout, its
    # slot comes back, and the next offer (the provider answering again) connects.
    import threading

    import server.ice_servers as ice_servers

    monkeypatch.setattr(ice_servers, "RTC_CONFIG_TIMEOUT_S", 0.5)
    release = threading.Event()
    hang = [True]

    def sync_config() -> dict:
        if hang[0]:
            release.wait(30)
        return {"iceServers": []}

    async def async_config() -> dict:
        if hang[0]:
            await asyncio.Event().wait()
        return {"iceServers": []}

    config = sync_config if kind == "sync" else async_config
    stream = Stream(Echo(), modality="audio", concurrency_limit=1, server_rtc_configuration=config)
    server = serve(stream)
    try:
        client, answer = await connect(server.http, "hung", audio=AudioSource(tone()), recv_audio=True)
        await client.close()
        assert answer["_status"] == 500 and answer["meta"]["error"] == "negotiation_failed", answer
        assert "no answer within 0.5 s" in answer["meta"]["detail"]
        assert stream.active_sessions == 0
        hang[0] = False
        client, answer = await connect(server.http, "next", audio=AudioSource(tone()), recv_audio=True)
        try:
            assert answer.get("type") == "answer", answer
        finally:
            await client.close()
    finally:
        release.set()


async def _page_rtc_configuration(base: str) -> dict:
    """What the /ui page gets when it asks for its RTCConfiguration (Gradio's HTTP API, as the
    page's script does: the `rtc_configuration` server function of the panel)."""
    async with httpx.AsyncClient(timeout=60) as http:
        cfg = (await http.get(f"{base}/ui/config")).json()
        prefix = f"{base}/ui{cfg.get('api_prefix', '/gradio_api')}"
        panel = next(c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == "batchrtc-panel")
        r = await http.post(f"{prefix}/component_server", json={
            "session_hash": "page1", "component_id": panel, "fn_name": "rtc_configuration", "data": None})
    assert r.status_code == 200, r.text
    return r.json()


async def test_the_ui_page_gets_fresh_credentials_from_a_helper(api, serve):
    """`rtc_configuration` as a helper (sync partial, or FastRTC's async Cloudflare helper):
    called for each page connection, its dict reaches the page as JSON."""
    rest = functools.partial(get_turn_rest_credentials, "s3cret", "turn:turn.example.org:3478", 600, "page")
    server = serve(Stream(Echo(), modality="audio", concurrency_limit=1, rtc_configuration=rest))
    first = await _page_rtc_configuration(server.http)
    assert first["iceServers"][0]["urls"] == ["turn:turn.example.org:3478"]
    assert re.fullmatch(r"\d+:page", first["iceServers"][0]["username"])
    cf = functools.partial(get_cloudflare_turn_credentials_async, CF_KEY_ID, CF_TOKEN, ttl=77)
    server = serve(Stream(Echo(), modality="audio", concurrency_limit=1, rtc_configuration=cf))
    assert await _page_rtc_configuration(server.http) == cloudflare_ice(77)
    assert [c["api"] for c in api] == ["cloudflare"]


# -- a real coturn ----------------------------------------------------------------------------------

def tone(seconds: float = 6.0) -> np.ndarray:
    t = np.arange(int(48000 * seconds)) / 48000
    return (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16)


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[TurnServer]:
    if shutil.which("turnserver") is None:
        pytest.skip("coturn's `turnserver` is not installed (apt-get install coturn; .ci/install-test-tools.sh does)")
    with run_turnserver(tmp_path) as ts:
        yield ts


async def _allocate(ts: TurnServer, username: str, credential: str) -> tuple[str, int]:
    transport, _ = await create_turn_endpoint(asyncio.DatagramProtocol, (ts.host, ts.port), username, credential)
    try:
        return transport.get_extra_info("sockname")
    finally:
        transport.close()
        await asyncio.sleep(0.1)  # let the allocation's deletion go out


async def test_coturn_accepts_the_helpers_credentials_and_refuses_wrong_or_expired_ones(coturn):
    good = get_turn_rest_credentials(coturn.secret, coturn.url, ttl=60, username="probe")["iceServers"][0]
    host, port = await _allocate(coturn, good["username"], good["credential"])
    assert host == "127.0.0.1" and port > 0
    wrong = get_turn_rest_credentials("not-" + coturn.secret, coturn.url, ttl=60)["iceServers"][0]
    expired = get_turn_rest_credentials(coturn.secret, coturn.url, ttl=60, now=0)["iceServers"][0]
    for creds in (wrong, expired):
        with pytest.raises(stun.TransactionFailed) as e:
            await _allocate(coturn, creds["username"], creds["credential"])
        assert e.value.response.attributes["ERROR-CODE"][0] == 401
    log = coturn.log()
    assert f"realm <{REALM}> user <{good['username']}>: incoming packet ALLOCATE processed, success" in log


def _candidate_types(sdp: str) -> set[str]:
    return set(re.findall(r"^a=candidate:.* typ (\w+)", sdp, re.M))


def _nominated(pc) -> list[Any]:
    """The nominated ICE candidate pairs of an aiortc peer connection (bundled: one transport)."""
    transports = {t.receiver.transport.transport for t in pc.getTransceivers()}
    pairs = []
    for ice in transports:
        pairs += list(ice._connection._nominated.values())  # aioice keeps them per component
    return pairs


async def test_a_webrtc_session_connects_through_coturn_with_relay_candidates_only(coturn, serve):
    server_creds = functools.partial(get_turn_rest_credentials, coturn.secret, coturn.url, 600, "server", relay_only=True)
    calls: list[dict] = []

    def server_config() -> dict:  # called for every offer: fresh credentials each time
        calls.append(server_creds())
        return calls[-1]

    stream = Stream(Echo(), modality="audio", mode="send-receive", concurrency_limit=2,
                    server_rtc_configuration=server_config)
    server = serve(stream)
    client_cfg = get_turn_rest_credentials(coturn.secret, coturn.url, 600, "client", relay_only=True)
    ice = client_cfg["iceServers"][0]
    configuration = RTCConfiguration(iceServers=[RTCIceServer(ice["urls"], ice["username"], ice["credential"])],
                                     iceTransportPolicy=RTCIceTransportPolicy.RELAY)
    client, answer = await connect(server.http, "relayed", audio=AudioSource(tone()), recv_audio=True,
                                   configuration=configuration)
    try:
        assert answer["type"] == "answer", answer
        assert len(calls) == 1
        # Both sides offered relay candidates and nothing else (no host address to fall back on).
        assert _candidate_types(client.pc.localDescription.sdp) == {"relay"}
        assert _candidate_types(answer["sdp"]) == {"relay"}
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline:
            if sum(np.abs(a.astype(np.int32)).mean() > 2000 for _, a in client.audio) > 50:
                break
            await asyncio.sleep(0.1)
        loud = [a for _, a in client.audio if np.abs(a.astype(np.int32)).mean() > 2000]
        assert len(loud) > 50, f"{len(loud)} loud frames came back through the relay"  # > 1 s of the echo
        pairs = _nominated(client.pc)
        assert pairs and all(p.local_candidate.type == "relay" and p.remote_candidate.type == "relay" for p in pairs)
        # coturn saw both ends allocate with the helper's credentials, and relayed data between them.
        log = coturn.log()
        for who in ("client", "server"):
            assert re.search(rf"user <\d+:{who}>: incoming packet ALLOCATE processed, success", log), who
            assert re.search(rf"user <\d+:{who}>: incoming packet CHANNEL_BIND processed, success", log), who
    finally:
        await client.close()
    await wait_for(lambda: stream.active_sessions == 0, 10)
    # Both allocations are deleted on close, and coturn logs what each relayed to its peer:
    # the audio both ways went through it (50 packets a second).
    relayed: dict[str, int] = {}
    for _ in range(100):
        for who, received, sent in re.findall(r"peer usage: realm=<[^>]*>, username=<\d+:(\w+)>, rp=(\d+), rb=\d+, sp=(\d+)",
                                              coturn.log()):
            relayed[who] = max(relayed.get(who, 0), min(int(received), int(sent)))
        if min(relayed.get("client", 0), relayed.get("server", 0)) >= 50:
            break
        await asyncio.sleep(0.1)
    assert min(relayed.get("client", 0), relayed.get("server", 0)) >= 50, relayed


async def test_a_hung_page_rtc_configuration_callable_times_out_on_its_own_threads():
    # The /ui page's `rtc_configuration` goes through the same call as the offer's: a sync
    # callable runs on the rtc-config threads (never the loop's default executor) and one
    # that hangs is given up on.
    import threading

    from server.ice_servers import call_rtc_configuration

    release = threading.Event()
    ran_on: list[str] = []

    def hung() -> dict:
        ran_on.append(threading.current_thread().name)
        release.wait(30)
        return {}

    try:
        with pytest.raises(TimeoutError, match="no answer within 0.2 s"):
            await call_rtc_configuration(hung, 0.2)
        assert ran_on and ran_on[0].startswith("rtc-config")
        assert await call_rtc_configuration(lambda: {"iceServers": []}, 5) == {"iceServers": []}

        async def also_hung() -> dict:
            await asyncio.Event().wait()
            return {}

        with pytest.raises(TimeoutError):
            await call_rtc_configuration(also_hung, 0.2)
    finally:
        release.set()
