"""MLXSERVE_API_KEYS: every route but the public probes needs a key, refused in each dialect's
shape; the official clients work with one; mlxctl sends it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import anthropic
import httpx
import ollama
import openai
import pytest
import trio
from support import start_daemon

from mlxserve.config import Settings, parse_api_keys
from mlxserve.http.app import PUBLIC_PATHS, create_app

KEYS = ("key-one-x8Jq", "key-two-P3zz")
WRONG = "key-wrong-0000"
BEARER = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture
async def keyed(models_dir):
    async with trio.open_nursery() as nursery:
        d = await start_daemon(nursery, models_dir, api_keys=KEYS)
        yield d
        d.shutdown.set()


def _concrete(rule: str) -> str:
    """A path for a route rule, its parameters filled in (a digest where one is asked for)."""
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: "sha256:" + "0" * 64 if m.group(1) == "digest" else "x", rule)


async def test_no_route_answers_without_a_key(keyed):
    # The app's own route table: a route added later is covered without touching this test.
    routes = [
        (_concrete(r.rule), m)
        for r in create_app(keyed.runtime).url_map.iter_rules()
        for m in sorted(r.methods - {"OPTIONS"})
    ]
    assert len(routes) > 25
    answered = set()
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as c:
            for path, method in [*routes, ("/api/no-such-route", "POST"), ("/v1/nothing", "GET")]:
                for headers in (
                    {},
                    {"Authorization": f"Bearer {WRONG}"},
                    {"x-api-key": WRONG},
                    {"Authorization": KEYS[0]},
                ):  # no Bearer scheme: not a key
                    r = await c.request(method, path, headers=headers, json={})
                    if r.status_code != 401:
                        answered.add(path)
                    else:
                        assert r.headers["www-authenticate"].startswith("Bearer")
            # With a key the refusal is gone (the public probes answer either way).
            r = await c.get("/api/tags", headers=BEARER)
            assert r.status_code == 200 and r.json()["models"]
            r = await c.get("/metrics", headers={"x-api-key": KEYS[0]})
            assert r.status_code == 200
    assert answered == set(PUBLIC_PATHS)


async def test_refusals_in_each_dialect_and_the_connection_stays_usable(keyed):
    def calls():
        out = {}
        with httpx.Client(base_url=keyed.url, timeout=httpx.Timeout(10, read=5)) as c:
            for path in (
                "/api/chat",
                "/v1/chat/completions",
                "/v1/messages",
                "/v1/messages/count_tokens",
                "/v1/responses",
            ):
                out[path] = [c.post(path, json={"model": "tiny", "pad": "x" * 100_000}) for _ in range(3)]
                out[path].append(c.get("/api/version"))  # on the same kept-alive connection
        return out

    with trio.fail_after(60):
        out = await trio.to_thread.run_sync(calls)
    for path, (*refused, after) in out.items():
        assert after.status_code == 200, path
        for r in refused:
            assert r.status_code == 401, (path, r.text)
            assert r.headers.get("connection", "").lower() != "close", path  # drained, kept
            body = r.json()
            if path.startswith("/api/"):
                assert body == {
                    "error": "missing API key: send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
                }
            elif path.startswith("/v1/messages"):
                assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
                assert "missing API key" in body["error"]["message"]
            else:
                assert body["error"]["code"] == "invalid_api_key"
                assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] is None


async def test_cors_preflight_needs_no_key(keyed):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=keyed.url, timeout=10) as c:
            r = await c.options(
                "/v1/chat/completions",
                headers={
                    "Origin": "http://localhost:3000",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            page = await c.post("/v1/chat/completions", json={}, headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 204
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    # The refusal itself is readable by the page (it carries the CORS header).
    assert page.status_code == 401 and page.headers["access-control-allow-origin"] == "http://localhost:3000"


async def test_official_clients_with_and_without_the_key(keyed):
    url = keyed.url

    def calls():
        out = {}
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=url, headers={"Authorization": ""}).list()
        out["ollama_none"] = e.value
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=url, headers={"Authorization": f"Bearer {WRONG}"}).chat(
                model="tiny", messages=[{"role": "user", "content": "hi"}]
            )
        out["ollama_wrong"] = e.value
        client = ollama.Client(host=url, headers=BEARER)
        out["ollama_list"] = client.list()
        out["ollama_chat"] = client.chat(
            model="tiny", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3}
        )

        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=f"{url}/v1", api_key=WRONG, max_retries=0).models.list()
        out["openai_wrong"] = e.value
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[0], max_retries=0)
        out["openai_models"] = oa.models.list()
        out["openai_chat"] = oa.chat.completions.create(
            model="tiny", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
        )

        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=url, api_key=WRONG, max_retries=0).messages.create(
                model="tiny", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
            )
        out["anthropic_wrong"] = e.value
        an = anthropic.Anthropic(base_url=url, api_key=KEYS[1], max_retries=0)  # sends x-api-key
        out["anthropic_msg"] = an.messages.create(
            model="tiny", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
        )
        out["anthropic_count"] = an.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": "hi"}])
        return out

    with trio.fail_after(120):
        out = await trio.to_thread.run_sync(calls)
    assert out["ollama_none"].status_code == 401 and "missing API key" in out["ollama_none"].error
    assert out["ollama_wrong"].status_code == 401 and out["ollama_wrong"].error == "invalid API key"
    assert any(m.model == "tiny:latest" for m in out["ollama_list"].models)
    assert out["ollama_chat"].done and out["ollama_chat"].eval_count == 3

    wrong = out["openai_wrong"]
    assert wrong.status_code == 401 and wrong.code == "invalid_api_key" and wrong.type == "invalid_request_error"
    assert any(m.id == "tiny:latest" for m in out["openai_models"].data)
    assert out["openai_chat"].usage.completion_tokens == 3

    wrong = out["anthropic_wrong"]
    assert wrong.status_code == 401
    assert wrong.body == {"type": "error", "error": {"type": "authentication_error", "message": "invalid API key"}}
    assert out["anthropic_msg"].usage.output_tokens == 3
    assert out["anthropic_count"].input_tokens > 0


async def test_keys_are_never_logged(models_dir, tmp_path):
    log_dir = tmp_path / "log"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir, api_keys=KEYS, log_dir=log_dir)
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                for key in (WRONG, KEYS[0]):
                    await c.post(
                        "/api/generate",
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
                    )
                    await c.post(
                        "/v1/messages",
                        headers={"x-api-key": key},
                        json={"model": "nothere", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
                    )
                metrics = (await c.get("/metrics", headers=BEARER)).text
            d.shutdown.set()  # the log is flushed by the time the daemon has stopped
    logged = (log_dir / "requests.jsonl").read_text()
    assert {json.loads(line).get("status") for line in logged.splitlines()} >= {401, 200, 404}
    for text in (logged, metrics):
        assert not any(k in text for k in (*KEYS, WRONG))


MLXCTL = [sys.executable, "-c", "from mlxserve.cli.main import main; main()"]


def _mlxctl(url: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLXSERVE_")}
    return subprocess.run(
        [*MLXCTL, "list"],
        env={**base, "MLXSERVE_HOST": url.removeprefix("http://"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_mlxctl_sends_the_key_from_its_environment(keyed, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# the daemon's keys\n\n{KEYS[1]}\n")
    with trio.fail_after(200):
        runs = {
            name: await trio.to_thread.run_sync(lambda env=env: _mlxctl(keyed.url, **env))
            for name, env in {
                "client key": {"MLXSERVE_API_KEY": KEYS[0]},
                "first of the daemon's": {"MLXSERVE_API_KEYS": f"{KEYS[1]},{WRONG}"},
                "from a file": {"MLXSERVE_API_KEYS": f"@{keyfile}"},
                "none": {},
                "wrong": {"MLXSERVE_API_KEY": WRONG, "MLXSERVE_API_KEYS": KEYS[0]},
            }.items()
        }
    for name in ("client key", "first of the daemon's", "from a file"):
        assert runs[name].returncode == 0 and "tiny:latest" in runs[name].stdout, (name, runs[name].stderr)
    assert runs["none"].returncode == 1 and "missing API key" in runs["none"].stderr
    assert runs["wrong"].returncode == 1 and "invalid API key" in runs["wrong"].stderr


def test_key_settings(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# comment\n  alpha  \n\nbeta\n")
    assert parse_api_keys(" a , b,,c ") == ("a", "b", "c")
    assert parse_api_keys(f"@{keyfile}") == ("alpha", "beta")
    s = Settings.from_env({"MLXSERVE_API_KEYS": f"@{keyfile}"})
    assert s.api_keys == ("alpha", "beta") and s.api_key == "alpha"
    assert Settings.from_env({"MLXSERVE_API_KEYS": "a", "MLXSERVE_API_KEY": "b"}).api_key == "b"
    assert Settings.from_env({}).api_keys == () and Settings.from_env({}).api_key is None
    assert "alpha" not in repr(s)
    for bad, says in (
        (" , ", "names no key"),
        (f"@{tmp_path / 'missing'}", "cannot read"),
        ("good,has space", "visible ASCII"),
        ("caf\u00e9", "visible ASCII"),
    ):
        with pytest.raises(ValueError, match=says):
            parse_api_keys(bad)
