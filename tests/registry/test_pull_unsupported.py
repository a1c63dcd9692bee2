"""A pulled Ollama model the engine cannot run is refused at pull, and one already stored
(pulled before that check) is refused with a 4xx naming its architecture, not a 500."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import httpx
import trio
from model_files import write_unsupported_gguf
from regfixtures import start_daemon

from mlxserve.store import fsutil, manifest as mt
from mlxserve.store.names import parse_name
from mlxserve.store.registry import RegistryClient, TransferOptions
from mlxserve.store.store import Store

QWEN_CONFIG = {
    "model_format": "gguf",
    "model_family": "falcon",
    "model_families": ["falcon"],
    "model_type": "1M",
    "file_type": "F32",
}


def _ollama_manifest(gguf: bytes) -> tuple[bytes, dict[str, bytes]]:
    """An Ollama-format manifest for ``gguf`` and its blobs by digest."""
    blobs: dict[str, bytes] = {}

    def desc(media_type: str, data: bytes) -> dict:
        digest = fsutil.sha256_bytes(data)
        blobs[digest] = data
        return mt.descriptor(media_type, digest, len(data))

    doc = {
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST_MEDIA_TYPE,
        "config": desc(mt.OLLAMA_CONFIG_MEDIA_TYPE, json.dumps(QWEN_CONFIG).encode()),
        "layers": [desc(mt.OLLAMA_MODEL, gguf), desc(mt.OLLAMA_TEMPLATE, b"{{ .Prompt }}")],
    }
    return json.dumps(doc).encode(), blobs


def _push_qwen(host: str, repo: str, gguf: bytes) -> dict[str, bytes]:
    data, blobs = _ollama_manifest(gguf)
    with RegistryClient(host, options=TransferOptions(retries=1, backoff=0.05)) as client:
        for digest, blob in blobs.items():
            client.upload_blob(repo, digest, len(blob), lambda blob=blob: io.BytesIO(blob))
        client.put_manifest(parse_name(f"{host}/{repo}:latest"), data, mt.DOCKER_MANIFEST_MEDIA_TYPE)
    return blobs


async def _pull_events(c: httpx.AsyncClient, name: str) -> list[dict]:
    async with c.stream("POST", "/api/pull", json={"model": name}) as r:
        assert r.status_code == 200
        return [json.loads(line) async for line in r.aiter_lines() if line.strip()]


async def test_pull_of_an_unsupported_architecture_is_refused_and_stores_nothing(
    registry, models_dir, tmp_path, fast_retries
):
    blobs = _push_qwen(registry.host, "library/qwen", write_unsupported_gguf(tmp_path / "q.gguf").read_bytes())
    name = f"{registry.host}/library/qwen:latest"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            store = d.runtime.store.store
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                whole = await c.post("/api/pull", json={"model": name, "stream": False})
                streamed = await _pull_events(c, name)  # the blobs are fetched again
                tags = (await c.get("/api/tags")).json()["models"]
                env = {
                    **{k: v for k, v in os.environ.items() if not k.startswith("MLXSERVE_")},
                    "MLXSERVE_HOST": d.url.removeprefix("http://"),
                }
                cli = await trio.to_thread.run_sync(
                    lambda: subprocess.run(
                        [sys.executable, "-c", "from mlxserve.cli.main import main; main()", "pull", name],
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=60,
                    )
                )
            d.shutdown.set()
    assert whole.status_code == 400
    message = whole.json()["error"]
    assert message.startswith(f"pull {name}: unsupported model architecture 'falcon'") and "llama" in message
    assert streamed[-1] == {"error": message}
    assert cli.returncode == 1 and "unsupported model architecture 'falcon'" in cli.stderr
    assert not any("qwen" in m["name"] for m in tags)
    assert not store.manifest_path(store.parse(name)).exists()
    assert not any(store.has_blob(digest) for digest in blobs)  # removed, as a refused create does


async def test_a_stored_unsupported_model_answers_4xx_naming_its_architecture(models_dir, tmp_path):
    # As a pull made before the check above left it: blobs and manifest in the store.
    store = Store(models_dir)
    data, blobs = _ollama_manifest(write_unsupported_gguf(tmp_path / "q.gguf").read_bytes())
    for digest, blob in blobs.items():
        store.blob_path(digest).write_bytes(blob)
    store.write_manifest("qwen", data)
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                ollama_gen = await c.post("/api/generate", json={"model": "qwen", "prompt": "hi", "stream": False})
                ollama_chat = await c.post(
                    "/api/chat", json={"model": "qwen", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                )
                oa = await c.post(
                    "/v1/chat/completions", json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
                )
                after = await c.post(
                    "/api/generate",
                    json={"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
                )
            d.shutdown.set()
    for r in (ollama_gen, ollama_chat):
        assert r.status_code == 422, r.text
        assert "unsupported" in r.json()["error"] and "'falcon'" in r.json()["error"]
    assert oa.status_code == 422 and "'falcon'" in oa.json()["error"]["message"]
    assert oa.json()["error"]["type"] == "invalid_request_error"
    assert after.status_code == 200  # the daemon serves on
