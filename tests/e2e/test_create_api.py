"""/api/create, /api/show and /api/tags against a real daemon, through the official ollama
client (run in a worker thread: it is synchronous) and plain httpx.

Create refuses with a status what could never run (an unsupported architecture, a FIFO), takes
Ollama's ``files``/``license``/``messages`` fields, refuses ``adapters``, and show/tags derive
the capabilities clients check before sending tools.
"""

from __future__ import annotations

import json
import os

import httpx
import ollama
import trio
from model_files import write_kquant_gguf, write_unsupported_gguf
from support import start_daemon

OPTS = {"temperature": 0, "num_predict": 1}


def client_call(url: str, fn):
    client = ollama.Client(host=url)
    try:
        return fn(client)
    except ollama.ResponseError as exc:
        return exc
    finally:
        client._client.close()


async def test_unsupported_architecture_is_refused_at_create(daemon, tmp_path):
    qwen = write_unsupported_gguf(tmp_path / "qwen.gguf")
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
            # Streamed as mlxctl streams it: still a 400, not an error line in a 200 stream.
            r = await http.post("/api/create", json={"model": "qwen", "modelfile": f"FROM {qwen}", "stream": True})
            assert r.status_code == 400, r.text
            assert "'falcon'" in r.json()["error"] and "llama" in r.json()["error"]

            def through_client(c: ollama.Client):
                digest = c.create_blob(qwen)
                once = client_call(daemon.url, lambda c2: c2.create(model="qwen", files={"qwen.gguf": digest}))
                streamed = client_call(
                    daemon.url, lambda c2: list(c2.create(model="qwen", files={"qwen.gguf": digest}, stream=True))
                )
                return [once, streamed]

            errors = await trio.to_thread.run_sync(client_call, daemon.url, through_client)
            for exc in errors:
                assert isinstance(exc, ollama.ResponseError), exc
                assert exc.status_code == 400 and "'falcon'" in exc.error
            tags = (await http.get("/api/tags")).json()["models"]
            assert "qwen:latest" not in {m["name"] for m in tags}


async def test_create_from_a_fifo_answers_and_blocks_no_other_write(daemon, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    try:
        with trio.fail_after(30):
            async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
                r = await http.post("/api/create", json={"model": "f", "modelfile": f"FROM {fifo}", "stream": False})
                assert r.status_code == 400 and "not a regular file" in r.json()["error"]
                r = await http.post("/api/copy", json={"source": "tiny", "destination": "tiny2"})
                assert r.status_code == 200
    finally:
        try:  # a create blocked in open() gets EOF and ends (so the daemon can stop)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


async def test_show_and_tags_derive_capabilities(nursery, smol_models_dir):
    d = await start_daemon(nursery, smol_models_dir)
    try:
        with trio.fail_after(60):
            shown = await trio.to_thread.run_sync(
                client_call, d.url, lambda c: {name: c.show(name).capabilities for name in ("smol", "tiny", "tiny-mlx")}
            )
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as http:
                tags = (await http.get("/api/tags")).json()["models"]
    finally:
        d.shutdown.set()
    for name, caps in shown.items():
        # tools: what llm-ollama and others check before sending tools; no insert (suffix is
        # refused), no thinking (think is refused), no vision.
        assert caps == ["completion", "tools"], (name, caps)
    assert {m["name"]: m["capabilities"] for m in tags}["smol:latest"] == ["completion", "tools"]


async def test_create_from_uploaded_files_with_license_and_messages(daemon, tiny_gguf, tiny_dir):
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]

    def create(c: ollama.Client):
        digest = c.create_blob(tiny_gguf)
        c.create(
            model="from-files",
            files={"tiny.gguf": digest},
            license="Tiny License 1.0",
            messages=messages,
            system="Answer briefly.",
            parameters={"temperature": 0},
        )
        c.create(model="from-files-plain", files={"tiny.gguf": digest}, system="Answer briefly.")
        directory = {f.name: c.create_blob(f) for f in sorted(tiny_dir.iterdir()) if f.is_file()}
        c.create(model="from-dir-files", files=directory)
        shown = c.show("from-files")
        chats = {
            m: c.chat(model=m, messages=[{"role": "user", "content": "And Italy?"}], options=OPTS)
            for m in ("from-files", "from-files-plain", "from-dir-files")
        }
        refused = [
            client_call(
                daemon.url, lambda c2: c2.create(model="lora", from_="tiny", adapters={"adapter.gguf": digest})
            ),
            client_call(daemon.url, lambda c2: c2.create(model="missing", files={"m.gguf": "sha256:" + "0" * 64})),
        ]
        return shown, chats, refused

    with trio.fail_after(120):
        shown, chats, refused = await trio.to_thread.run_sync(client_call, daemon.url, create)
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
            raw = (await http.post("/api/show", json={"model": "from-files"})).json()
            names = {m["name"] for m in (await http.get("/api/tags")).json()["models"]}
    assert not isinstance(shown, Exception), shown
    assert shown.license == "Tiny License 1.0"
    assert shown.details.family == "llama" and "temperature" in shown.parameters
    assert raw["messages"] == messages and raw["system"] == "Answer briefly."
    assert 'MESSAGE assistant "Paris."' in raw["modelfile"]
    # The stored messages are prepended to the conversation, as Ollama does.
    assert chats["from-files"].prompt_eval_count > chats["from-files-plain"].prompt_eval_count
    assert chats["from-dir-files"].done and chats["from-dir-files"].eval_count == 1
    lora, missing = refused
    assert isinstance(lora, ollama.ResponseError) and lora.status_code == 400
    assert "adapters are not supported" in lora.error
    assert isinstance(missing, ollama.ResponseError) and missing.status_code == 400
    assert "not found" in missing.error and "upload" in missing.error
    assert {"from-files:latest", "from-dir-files:latest"} <= names
    assert not {"lora:latest", "missing:latest"} & names


async def test_streamed_create_answers_client_errors_with_their_status(daemon, tmp_path):
    kquant_gguf_path = tmp_path / "kq.gguf"
    write_kquant_gguf(kquant_gguf_path)
    cases = [
        ({"from": "tiny", "parameters": {"temperature": "hot"}}, 400, "temperature"),
        ({"from": "no-such-model"}, 404, "not found"),
        ({"from": "tiny", "template": "{% if %}"}, 400, "template"),
    ]
    with trio.fail_after(120):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as http:
            for fields, status, words in cases:
                r = await http.post("/api/create", json={"model": "x", "stream": True, **fields})
                assert r.status_code == status and words in r.json()["error"], (fields, r.text)
            # A create that converts (K-quant GGUF) streams its progress and ends in success.
            async with http.stream(
                "POST", "/api/create", json={"model": "kq", "modelfile": f"FROM {kquant_gguf_path}"}
            ) as r:
                assert r.status_code == 200
                statuses = [json.loads(line).get("status") async for line in r.aiter_lines() if line.strip()]
    assert "converting model" in statuses and statuses[-1] == "success"


async def test_create_fields_are_stored_exactly(daemon):
    # Fields used to be pasted into Modelfile text: a template with """ in it broke the syntax.
    template = 'Say """{% for m in messages %}{{ m.content }}{% endfor %}"""'
    system = 'Quote "exactly".\nTwo lines.'

    def create(c: ollama.Client):
        c.create(
            model="exact", from_="tiny", template=template, system=system, license=["First license.", "Second license."]
        )
        return c.show("exact")

    with trio.fail_after(60):
        shown = await trio.to_thread.run_sync(client_call, daemon.url, create)
    assert not isinstance(shown, Exception), shown
    assert shown.template == template and shown.modelfile.count("LICENSE") == 1
    assert "First license." in shown.license and "Second license." in shown.license
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
        raw = (await http.post("/api/show", json={"model": "exact"})).json()
    assert raw["system"] == system
