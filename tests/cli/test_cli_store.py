"""``mlxctl verify`` and ``mlxctl create`` run as the user runs them (a subprocess), against a
real store and a real daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio
from model_files import write_unsupported_gguf

MLXCTL = [sys.executable, "-c", "from mlxserve.cli.main import main; main()"]


def mlxctl(
    *args: str, models_dir: Path | None = None, url: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXSERVE_")}
    if models_dir is not None:
        env["MLXSERVE_MODELS"] = str(models_dir)
    if url is not None:
        env["MLXSERVE_HOST"] = url.removeprefix("http://")
    return subprocess.run([*MLXCTL, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_verify_reports_a_corrupt_manifest_and_checks_the_rest(models_dir):
    # "aaa" sorts first: the models after it must still be checked.
    corrupt = models_dir / "manifests/registry.ollama.ai/library/aaa/latest"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"{not json")
    out = mlxctl("verify", models_dir=models_dir)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert any(l.startswith("BAD aaa:latest manifest") and "not valid JSON" in l for l in lines)
    ok = [l for l in lines if l.startswith("ok ")]
    assert {l.split()[1] for l in ok} == {"tiny:latest", "tiny-mlx:latest"}
    assert lines[-1] == f"{len(ok)} blob(s) checked, 1 problem(s)"

    one = mlxctl("verify", "aaa", models_dir=models_dir)
    assert one.returncode == 1 and one.stdout.startswith("BAD aaa:latest manifest")
    missing = mlxctl("verify", "nothere", models_dir=models_dir)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "model 'nothere' not found" in missing.stderr


async def test_create_of_an_unsupported_architecture_fails_and_stores_nothing(daemon, tmp_path):
    write_unsupported_gguf(tmp_path / "qwen.gguf")
    (tmp_path / "Modelfile").write_text("FROM ./qwen.gguf\n")
    with trio.fail_after(120):
        out = await trio.to_thread.run_sync(
            lambda: mlxctl("create", "qwen", "-f", "Modelfile", url=daemon.url, cwd=tmp_path)
        )
        listed = await trio.to_thread.run_sync(lambda: mlxctl("list", url=daemon.url))
    assert out.returncode == 1, out.stdout
    assert "unsupported model architecture 'falcon'" in out.stderr and "llama" in out.stderr
    assert listed.returncode == 0 and "tiny" in listed.stdout and "qwen" not in listed.stdout
