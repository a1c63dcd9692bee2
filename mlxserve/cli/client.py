"""What every ``mlxctl`` command that talks to the daemon shares: settings, the HTTP client, errors."""

from __future__ import annotations

import json
import sys
from typing import AsyncIterator, Callable

import asyncclick as click
import httpx


def settings():
    from ..config import Settings

    try:
        return Settings.from_env()
    except ValueError as exc:  # a bad MLXSERVE_* value: say which, not a traceback
        raise click.UsageError(f"bad setting: {exc}") from None


def auth_headers(settings) -> dict[str, str]:
    """The daemon's API key (MLXSERVE_API_KEY, else the first of MLXSERVE_API_KEYS), if any."""
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


def client(timeout: float | None = None) -> httpx.AsyncClient:
    s = settings()
    return httpx.AsyncClient(base_url=s.base_url, headers=auth_headers(s), timeout=httpx.Timeout(timeout, connect=5.0))


def fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


async def check(resp: httpx.Response) -> dict:
    if resp.status_code >= 400:
        try:
            body = json.loads(await resp.aread())
            msg = body.get("error")
            msg = msg.get("message") if isinstance(msg, dict) else msg
        except ValueError:
            msg = resp.text
        fail(msg or f"HTTP {resp.status_code}")
    return json.loads(await resp.aread()) if resp.content else {}


async def events(path: str, body: dict, *, before_fail: Callable[[], None] = lambda: None) -> AsyncIterator[dict]:
    """POST ``path`` and yield its NDJSON events; an error status or error event ends the command
    (``before_fail`` runs first, e.g. to stop progress bars)."""
    try:
        async with client() as c:
            async with c.stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    before_fail()
                    await check(resp)
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if "error" in event:
                        before_fail()
                        fail(event["error"])
                    yield event
    except httpx.ConnectError:
        before_fail()
        fail(f"could not connect to mlxserve at {settings().base_url}; is `mlxctl serve` running?")


async def request(method: str, path: str, body: dict | None = None) -> dict:
    try:
        async with client() as c:
            return await check(await c.request(method, path, json=body))
    except httpx.ConnectError:
        fail(f"could not connect to mlxserve at {settings().base_url}; is `mlxctl serve` running?")
