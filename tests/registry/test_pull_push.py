"""Push and pull through a real daemon against the real CNCF distribution registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from regfixtures import free_port, start_daemon

from mlxserve.errors import MlxserveError
from mlxserve.store import fsutil, manifest as mt, transfer
from mlxserve.store.registry import STATS, RegistryClient, RegistryError, TransferOptions
from mlxserve.store.store import Store

GREEDY = {"temperature": 0, "num_predict": 4}
PAD_SIZE = 64 << 20
PAD_TYPE = "application/vnd.mlxserve.test.padding"


async def _events(c: httpx.AsyncClient, path: str, body: dict) -> tuple[int, list[dict]]:
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, [r.json()]
        return 200, [json.loads(line) async for line in r.aiter_lines() if line.strip()]


def _blob_digests(store: Store, name: str) -> tuple[str, list[str]]:
    r = store.resolve(name)
    return r.digest, sorted(d["digest"] for d in [r.manifest["config"], *r.layers])


async def test_push_rm_pull_roundtrip_then_pull_again_moves_nothing(registry, models_dir, fast_retries):
    remote = f"{registry.host}/library/tiny:latest"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            store = d.runtime.store.store
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                assert (await c.post("/api/copy", json={"source": "tiny", "destination": remote})).status_code == 200
                before = _blob_digests(store, remote)

                code, pushed = await _events(c, "/api/push", {"model": remote})
                assert code == 200 and pushed[0] == {"status": "retrieving manifest"}
                assert [e["status"] for e in pushed[-2:]] == ["pushing manifest", "success"]
                assert {e["digest"] for e in pushed if "digest" in e} == set(before[1])
                # Pushing again finds every blob in the registry: nothing is sent.
                sent = STATS.blob_bytes_sent
                r = await c.post("/api/push", json={"model": remote, "stream": False})
                assert r.json() == {"status": "success"} and STATS.blob_bytes_sent == sent

                assert (await c.request("DELETE", "/api/delete", json={"model": remote})).status_code == 200
                assert (await c.request("DELETE", "/api/delete", json={"model": "tiny"})).status_code == 200
                # The GGUF is really gone (small text layers may be shared with tiny-mlx).
                gone = [dg for dg in before[1] if not store.has_blob(dg)]
                assert len(gone) >= 2
                received = STATS.blob_bytes_received
                code, pulled = await _events(c, "/api/pull", {"model": remote})
                assert STATS.blob_bytes_received - received == sum(store.blob_path(dg).stat().st_size for dg in gone)
                assert code == 200, pulled
                statuses = [e["status"] for e in pulled]
                assert statuses[0] == "pulling manifest"
                assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
                layer_events = [e for e in pulled if "digest" in e]
                assert {e["digest"] for e in layer_events} == set(before[1])
                for e in layer_events:
                    assert e["status"] == f"pulling {e['digest'][7:19]}"
                    assert 0 <= e["completed"] <= e["total"]
                assert _blob_digests(store, remote) == before  # identical manifest and blobs

                r = await c.post(
                    "/api/generate", json={"model": remote, "prompt": "Hello", "stream": False, "options": GREEDY}
                )
                assert r.status_code == 200, r.text
                assert r.json()["done"] and r.json()["eval_count"] == 4

                # A second pull: every layer is complete in its first event, no byte moves.
                received = STATS.blob_bytes_received
                code, again = await _events(c, "/api/pull", {"model": remote})
                assert code == 200 and again[-1] == {"status": "success"}
                first: dict[str, dict] = {}
                for e in again:
                    if "digest" in e:
                        first.setdefault(e["digest"], e)
                assert len(first) == len(before[1])
                assert all(e["completed"] == e["total"] for e in first.values())
                assert STATS.blob_bytes_received == received
            d.shutdown.set()


async def test_unknown_tag_is_404_and_bad_name_400(registry, models_dir, fast_retries):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                for stream in (True, False):
                    r = await c.post("/api/pull", json={"model": f"{registry.host}/library/nope:v9", "stream": stream})
                    assert r.status_code == 404, r.text
                    assert "not found" in r.json()["error"] and "nope" in r.json()["error"]
                    r = await c.post("/api/pull", json={"model": "../etc/passwd", "stream": stream})
                    assert r.status_code == 400 and "invalid model name" in r.json()["error"]
                    r = await c.post("/api/push", json={"name": f"{registry.host}/x/absent", "stream": stream})
                    assert r.status_code == 404
                r = await c.post("/api/pull", json={})
                assert r.status_code == 400
                # A registry that is not there: a clear 502 naming it, and nothing written.
                dead = f"127.0.0.1:{free_port()}/a/b"
                r = await c.post("/api/pull", json={"model": dead})
                assert r.status_code == 502 and "127.0.0.1" in r.json()["error"]
            d.shutdown.set()


def _push_padded(store: Store, host: str, name: str) -> dict:
    """Push the tiny model plus a 64 MiB padding layer (chunked PATCH upload) under ``name``;
    returns the padding layer's descriptor."""
    base = store.resolve("tiny")
    pad = os.urandom(PAD_SIZE)
    pad_desc = mt.descriptor(PAD_TYPE, fsutil.sha256_bytes(pad), PAD_SIZE)
    data = mt.build_manifest(base.manifest["config"], [*base.layers, pad_desc])
    opts = TransferOptions(chunk_size=16 << 20, retries=1, backoff=0.05)
    mn = store.parse(name)
    repo = f"{mn.namespace}/{mn.name}"
    with RegistryClient(host, options=opts) as client:
        for d in [base.manifest["config"], *base.layers]:
            client.upload_blob(repo, d["digest"], d["size"], lambda d=d: open(store.blob_path(d["digest"]), "rb"))
        import io

        patches = []
        assert client.upload_blob(repo, pad_desc["digest"], PAD_SIZE, lambda: io.BytesIO(pad), patches.append)
        assert len(patches) == 4  # four 16 MiB PATCHes
        client.put_manifest(mn, data, mt.MANIFEST_MEDIA_TYPE)
    return pad_desc


async def test_killed_registry_fails_cleanly_then_pull_resumes_after_restarts(registry, models_dir, fast_retries):
    name = f"{registry.host}/test/padded:v1"
    store = Store(models_dir)
    with trio.fail_after(60):
        pad = await trio.to_thread.run_sync(_push_padded, store, registry.host, name)
        seen = {"at_kill": 0}

        def progress(event: dict) -> None:
            # Runs on the downloading thread: the registry dies mid-blob, deterministically.
            if event.get("digest") == pad["digest"] and event["completed"] >= PAD_SIZE // 3 and not seen["at_kill"]:
                seen["at_kill"] = event["completed"]
                registry.kill()

        received0 = STATS.blob_bytes_received
        with pytest.raises(RegistryError) as err:
            await trio.to_thread.run_sync(
                lambda: transfer.pull(
                    store, name, progress=progress, options=TransferOptions(retries=2, backoff=0.05, stall_timeout=10)
                )
            )
        assert registry.host in str(err.value)
        received_first = STATS.blob_bytes_received - received0
        assert 0 < seen["at_kill"] < PAD_SIZE
        # Failed cleanly: no manifest, no padding blob, a partial with its progress record.
        with pytest.raises(MlxserveError):
            store.resolve(name)
        assert not store.has_blob(pad["digest"])
        part, rec = transfer.partial_paths(store, pad["digest"])
        record = json.loads(rec.read_text())
        assert record["digest"] == pad["digest"] and record["completed"] == part.stat().st_size
        assert 0 < record["completed"] < PAD_SIZE

        registry.restart()
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)  # a new daemon: a new Store, same dir
            received1 = STATS.blob_bytes_received
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                code, events = await _events(c, "/api/pull", {"model": name})
            assert code == 200 and events[-1] == {"status": "success"}, events[-3:]
            received_second = STATS.blob_bytes_received - received1
            pad_events = [e for e in events if e.get("digest") == pad["digest"]]
            resumed_at = pad_events[0]["completed"]
            assert resumed_at == record["completed"]
            assert pad_events[-1]["completed"] == PAD_SIZE
            d.shutdown.set()
    # The small blobs were in the store already, so every byte received was the padding's.
    retransferred = received_first + received_second - PAD_SIZE
    fraction = retransferred / PAD_SIZE
    print(
        f"\nresume: the first pull got {received_first} bytes of the {PAD_SIZE}-byte blob, "
        f"the second resumed at {resumed_at} and fetched {received_second}; re-transferred "
        f"{retransferred} bytes = {fraction:.2%}"
    )
    assert received_second == PAD_SIZE - resumed_at  # the small blobs were already complete
    assert fraction < 0.10
    assert fsutil.hash_file(store.blob_path(pad["digest"]))[0] == pad["digest"]
    assert not part.exists() and not rec.exists()


async def test_cli_commands_against_daemon(registry, models_dir, fast_retries):
    remote = f"{registry.host}/library/tiny:cli"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            await d.runtime.store.copy("tiny", remote)
            env = {**os.environ, "MLXSERVE_HOST": d.url.split("//")[1], "MLXSERVE_MODELS": str(models_dir)}

            def mlxctl(*args: str) -> subprocess.CompletedProcess:
                return subprocess.run(
                    [str(Path(sys.executable).with_name("mlxctl")), *args],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=60,
                )

            out = await trio.to_thread.run_sync(mlxctl, "push", remote)
            assert out.returncode == 0, out.stderr
            assert "success" in out.stderr
            await d.runtime.store.delete(remote)
            out = await trio.to_thread.run_sync(mlxctl, "pull", remote, "--insecure")
            assert out.returncode == 0, out.stderr
            assert "writing manifest" in out.stderr and "success" in out.stderr
            await d.runtime.store.resolve(remote)
            out = await trio.to_thread.run_sync(mlxctl, "pull", f"{registry.host}/library/no:pe")
            assert out.returncode == 1 and "not found" in out.stderr
            d.shutdown.set()
