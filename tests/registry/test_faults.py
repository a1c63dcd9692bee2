"""Pulls from the fault-injection stand-in registry: bearer tokens, Ollama-format manifests,
wrong bytes, stalls, cancellation."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
from pathlib import Path

import httpx
import pytest
import trio
from regfixtures import StandIn, sha, start_daemon

from mlxserve.engine import convert
from mlxserve.store import manifest as mt, transfer
from mlxserve.store.registry import RegistryDigestMismatch, TransferOptions
from mlxserve.store.store import Store

OLLAMA_CONFIG = {
    "model_format": "gguf",
    "model_family": "llama",
    "model_families": ["llama"],
    "model_type": "1M",
    "file_type": "F32",
}


def _ollama_model(s: StandIn, repo: str, tag: str, gguf: bytes, template: str = "{{ .System }}{{ .Prompt }}") -> dict:
    """An Ollama-format manifest (Docker schema 2, application/vnd.ollama.image.* layers)."""

    def desc(media_type: str, data: bytes) -> dict:
        return {"mediaType": media_type, **s.add_blob(data)}

    doc = {
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST_MEDIA_TYPE,
        "config": desc(mt.OLLAMA_CONFIG_MEDIA_TYPE, json.dumps(OLLAMA_CONFIG).encode()),
        "layers": [
            desc(mt.OLLAMA_MODEL, gguf),
            desc(mt.OLLAMA_TEMPLATE, template.encode()),
            desc(mt.OLLAMA_SYSTEM, b"You are terse."),
            desc(mt.OLLAMA_PARAMS, json.dumps({"stop": ["<|im_end|>"], "temperature": 0, "num_predict": 3}).encode()),
            desc(mt.OLLAMA_LICENSE, b"MIT"),
        ],
    }
    s.add_manifest(repo, tag, doc, mt.DOCKER_MANIFEST_MEDIA_TYPE)
    return doc


async def _events(c: httpx.AsyncClient, body: dict) -> tuple[int, list[dict]]:
    async with c.stream("POST", "/api/pull", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, [r.json()]
        return 200, [json.loads(line) async for line in r.aiter_lines() if line.strip()]


async def test_ollama_format_pull_with_bearer_token_runs(stand_in, models_dir, tiny_gguf, fast_retries):
    doc = _ollama_model(stand_in, "library/ollm", "latest", tiny_gguf.read_bytes())
    name = f"{stand_in.host}/library/ollm:latest"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                code, events = await _events(c, {"model": name})
                assert code == 200 and events[-1] == {"status": "success"}, events
                assert stand_in.token_requests >= 1  # the 401 challenge was answered
                show = (await c.post("/api/show", json={"model": name})).json()
                r = await c.post("/api/generate", json={"model": name, "prompt": "Hi", "stream": False})
                assert r.status_code == 200, r.text
                assert r.json()["eval_count"] <= 3  # num_predict from the params layer
            resolved = d.runtime.store.store.resolve(name)
            d.shutdown.set()
    assert resolved.manifest == doc  # stored exactly as the registry served it
    assert resolved.spec.template == "{{ .System }}{{ .Prompt }}"  # kept; the GGUF's goes first at render
    assert resolved.spec.system == "You are terse."
    assert resolved.spec.parameters.stop == ["<|im_end|>"]
    assert show["details"]["format"] == "gguf"


def _kquant_writer():
    path = Path(__file__).parents[1] / "store" / "conftest.py"
    spec = importlib.util.spec_from_file_location("store_conftest_for_registry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_kquant_gguf


def test_ollama_kquant_gguf_is_converted_at_pull(stand_in, tmp_path):
    gguf = tmp_path / "kq.gguf"
    _kquant_writer()(gguf)
    _ollama_model(stand_in, "library/kq", "q4_k_m", gguf.read_bytes())
    store = Store(tmp_path / "models", converter=convert)  # as the daemon opens it
    events: list[dict] = []
    result = transfer.pull(store, f"{stand_in.host}/library/kq:q4_k_m", progress=events.append)
    assert result.converted
    resolved = store.resolve(f"{stand_in.host}/library/kq:q4_k_m")
    assert resolved.spec.format == "safetensors" and "dequantized" in resolved.spec.conversion
    assert resolved.spec.system == "You are terse." and resolved.spec.parameters.num_predict == 3
    assert resolved.spec.template is not None  # the GGUF's own chat template
    statuses = [e["status"] for e in events]
    assert any(s.startswith("converting model") for s in statuses)
    assert statuses[-1] == "success" and statuses.count("success") == 1


async def test_wrong_bytes_fail_the_pull_and_commit_nothing(stand_in, models_dir, tiny_gguf, fast_retries):
    doc = _ollama_model(stand_in, "library/bad", "latest", os.urandom(3 << 20))
    bad = doc["layers"][0]["digest"]
    stand_in.corrupt.add(bad)
    name = f"{stand_in.host}/library/bad:latest"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            store = d.runtime.store.store
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                code, events = await _events(c, {"model": name})
                assert code == 200  # blobs had started moving: the error is the last line
                err = events[-1]["error"]
                assert bad in err and "expected" in err and "got sha256:" in err
                assert not any(e.get("status") == "writing manifest" for e in events)
                r = await c.post("/api/pull", json={"model": name, "stream": False})
                assert r.status_code == 502 and bad in r.json()["error"]
                assert (await c.post("/api/show", json={"model": name})).status_code == 404
            d.shutdown.set()
    for desc in [doc["config"], *doc["layers"]]:
        assert not store.has_blob(desc["digest"])  # nothing committed
    part, rec = transfer.partial_paths(store, bad)
    assert not part.exists() and not rec.exists()  # the bad partial is gone


def test_stalled_download_is_detected_and_resumed_with_range(stand_in, tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes() + os.urandom(4 << 20)  # a model pull accepts, made large
    desc = {"mediaType": mt.OLLAMA_MODEL, **stand_in.add_blob(data)}
    config = {"mediaType": mt.OLLAMA_CONFIG_MEDIA_TYPE, **stand_in.add_blob(b"{}")}
    stand_in.add_manifest(
        "a/stall", "latest", {"schemaVersion": 2, "config": config, "layers": [desc]}, mt.MANIFEST_MEDIA_TYPE
    )
    stand_in.stall[desc["digest"]] = 1 << 20
    store = Store(tmp_path / "models")
    transfer.pull(
        store, f"{stand_in.host}/a/stall", options=TransferOptions(stall_timeout=0.5, backoff=0.01, retries=2)
    )
    assert store.has_blob(desc["digest"])
    ranges = [rng for method, path, rng in stand_in.requests if method == "GET" and desc["digest"] in path]
    assert ranges[0] is None and ranges[-1] == f"bytes={1 << 20}-"


async def test_client_disconnect_cancels_pull_and_keeps_partial(stand_in, models_dir, tiny_gguf, fast_retries):
    data = tiny_gguf.read_bytes() + os.urandom(4 << 20)  # a model pull accepts, made large
    desc = {"mediaType": mt.OLLAMA_MODEL, **stand_in.add_blob(data)}
    config = {"mediaType": mt.OLLAMA_CONFIG_MEDIA_TYPE, **stand_in.add_blob(b"{}")}
    stand_in.add_manifest(
        "a/cancel", "latest", {"schemaVersion": 2, "config": config, "layers": [desc]}, mt.MANIFEST_MEDIA_TYPE
    )
    stand_in.stall[desc["digest"]] = 1 << 20  # then silent for longer than the test
    name = f"{stand_in.host}/a/cancel"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            store = d.runtime.store.store
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                async with c.stream("POST", "/api/pull", json={"model": name}) as r:
                    async for line in r.aiter_lines():
                        e = json.loads(line)
                        if e.get("digest") == desc["digest"] and e["completed"] > 0:
                            break  # the client leaves mid-blob
            part, rec = transfer.partial_paths(store, desc["digest"])

            def wait_released() -> None:
                # The pull holds an exclusive flock on its partial until it has stopped.
                fd = os.open(part, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                finally:
                    os.close(fd)

            with trio.fail_after(5):  # well under the 10 s stall timeout: the cancel did it
                await trio.to_thread.run_sync(wait_released)
            kept = json.loads(rec.read_text())["completed"]
            assert 0 < kept <= 1 << 20 and part.stat().st_size == kept
            assert not store.has_blob(desc["digest"])
            stand_in.release.set()
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                r = await c.post("/api/pull", json={"model": name, "stream": False})
                assert r.json() == {"status": "success"}
            ranges = [rng for method, path, rng in stand_in.requests if method == "GET" and desc["digest"] in path]
            assert ranges == [None, f"bytes={kept}-"]
            d.shutdown.set()


def test_digest_mismatch_via_direct_call_names_both_digests(stand_in, tmp_path):
    blob = b"x" * 1000
    desc = {"mediaType": mt.OLLAMA_MODEL, **stand_in.add_blob(blob)}
    config = {"mediaType": mt.OLLAMA_CONFIG_MEDIA_TYPE, **stand_in.add_blob(b"{}")}
    stand_in.add_manifest(
        "a/m", "latest", {"schemaVersion": 2, "config": config, "layers": [desc]}, mt.MANIFEST_MEDIA_TYPE
    )
    stand_in.corrupt.add(desc["digest"])
    store = Store(tmp_path / "models")
    with pytest.raises(RegistryDigestMismatch) as err:
        transfer.pull(store, f"{stand_in.host}/a/m")
    got = sha(bytes([blob[0] ^ 0xFF]) + blob[1:])
    assert desc["digest"] in str(err.value) and got in str(err.value)
    assert err.value.status == 502
    assert not list(store.manifests_dir.rglob("*"))  # no manifest, not even a directory
