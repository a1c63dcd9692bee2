"""Browser origins and Host names, on a real daemon.

Any web page can make a browser send a "simple" cross-site POST (text/plain, no preflight) to
127.0.0.1: the daemon refuses it unless the page's Origin is allowed (the local ones by default,
more through MLXSERVE_ORIGINS), as Ollama does with OLLAMA_ORIGINS.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from support import start_daemon

from mlxserve.config import Settings

LOCAL_ORIGINS = [
    "http://localhost",
    "http://localhost:3000",
    "https://127.0.0.1:8443",
    "http://0.0.0.0:8080",
    "http://[::1]:5173",
    "app://obsidian.md",
    "file://",
    "tauri://localhost",
    "vscode-webview://1234abcd",
    "vscode-file://vscode-app",
    "HTTP://LOCALHOST:3000",
]
FOREIGN_ORIGINS = [
    "http://evil.example",
    "https://localhost.evil.example",
    "http://127.0.0.1.evil.example",
    "null",
    "chrome-extension://abcdef",
]
SIMPLE = {"content-type": "text/plain"}  # what a page may send cross-site with no preflight


async def test_cross_origin_requests_are_refused_and_not_executed(daemon):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as c:
            for origin in FOREIGN_ORIGINS:
                # /api/copy would create a model: refused means not done.
                body = json.dumps({"source": "tiny", "destination": "stolen"})
                r = await c.post("/api/copy", content=body, headers={**SIMPLE, "origin": origin})
                assert r.status_code == 403 and set(r.json()) == {"error"}, (origin, r.status_code, r.text)
                assert "access-control-allow-origin" not in r.headers
                r = await c.post(
                    "/v1/chat/completions",
                    content=json.dumps({"model": "tiny", "messages": []}),
                    headers={**SIMPLE, "origin": origin},
                )
                err = r.json()["error"]
                assert r.status_code == 403 and err["type"] == "permission_error" and "message" in err, r.text
                r = await c.options("/api/chat", headers={"origin": origin, "access-control-request-method": "POST"})
                assert r.status_code == 403, (origin, r.status_code)
            names = {m["name"] for m in (await c.get("/api/tags")).json()["models"]}
            assert "stolen:latest" not in names
            # No Origin (curl, SDKs, the CLI) and same-origin requests are not cross-origin.
            assert (await c.get("/api/tags")).status_code == 200
            host = daemon.url.split("://", 1)[1]
            r = await c.get("/api/tags", headers={"origin": f"http://{host}"})
            assert r.status_code == 200


async def test_local_origins_are_allowed_with_cors_headers(daemon):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as c:
            for origin in LOCAL_ORIGINS:
                r = await c.get("/api/tags", headers={"origin": origin})
                assert r.status_code == 200, (origin, r.text)
                assert r.headers["access-control-allow-origin"] == origin
                assert "origin" in r.headers["vary"].lower()
                r = await c.options(
                    "/v1/chat/completions",
                    headers={
                        "origin": origin,
                        "access-control-request-method": "POST",
                        "access-control-request-headers": "content-type, authorization, x-stainless-os",
                    },
                )
                assert r.status_code == 204, (origin, r.status_code, r.text)
                assert r.headers["access-control-allow-origin"] == origin
                assert "POST" in r.headers["access-control-allow-methods"]
                allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
                assert {"authorization", "content-type", "x-api-key", "x-stainless-os"} <= allowed
            # An allowed origin's errors carry the header too, so the page can read them.
            r = await c.post("/api/show", json={"model": "nope"}, headers={"origin": "http://localhost:3000"})
            assert r.status_code == 404 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


@pytest.mark.parametrize(
    "origins,allowed,refused",
    [
        (
            ("https://*.example.com", "http://myapp.test:8080"),
            ["https://chat.example.com", "http://myapp.test:8080", "http://localhost:1"],
            ["https://example.org", "http://myapp.test:8081", "http://chat.example.com"],
        ),
        (("chrome-extension://*",), ["chrome-extension://abcdef"], ["moz-extension://abcdef"]),
    ],
)
async def test_mlxserve_origins_adds_to_the_defaults(models_dir, origins, allowed, refused):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir, origins=origins)
            try:
                async with httpx.AsyncClient(base_url=d.url, timeout=10) as c:
                    for origin in allowed:
                        r = await c.get("/api/tags", headers={"origin": origin})
                        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, origin
                    for origin in refused:
                        assert (await c.get("/api/tags", headers={"origin": origin})).status_code == 403, origin
            finally:
                d.shutdown.set()


async def test_star_allows_every_origin(models_dir):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir, origins=("*",))
            try:
                async with httpx.AsyncClient(base_url=d.url, timeout=10) as c:
                    r = await c.get("/api/tags", headers={"origin": "https://anything.example"})
                    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
            finally:
                d.shutdown.set()


def test_origins_setting_is_read_from_the_environment():
    s = Settings.from_env({"MLXSERVE_ORIGINS": " https://a.example , chrome-extension://*,,"})
    assert s.origins == ("https://a.example", "chrome-extension://*")
    assert Settings.from_env({}).origins == ()


async def test_host_check_ignores_case_and_still_refuses_foreign_hosts(daemon):
    port = daemon.url.rsplit(":", 1)[1]
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as c:
            for host in (
                f"LOCALHOST:{port}",
                "LocalHost",
                f"api.LOCALHOST:{port}",
                "localhost.",
                f"[::1]:{port}",
                f"127.0.0.1:{port}",
            ):
                r = await c.get("/api/tags", headers={"host": host})
                assert r.status_code == 200, (host, r.status_code, r.text)
            for host in ("evil.example", f"EVIL.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io"):
                r = await c.get("/api/tags", headers={"host": host})
                assert r.status_code == 403 and r.json() == {"error": "forbidden host"}, (host, r.text)


async def test_unknown_route_is_not_a_missing_model(daemon):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as c:
            r = await c.post("/v1/no-such-route", json={"model": "tiny"})
            assert r.status_code == 404 and r.json()["error"]["code"] is None, r.text
            r = await c.post(
                "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
            )
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
