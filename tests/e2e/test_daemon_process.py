"""`mlxctl serve` as a real process with the embedded SmolLM2, driven by `mlxctl` commands."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_gguf):
    models = tmp_path_factory.mktemp("smol-models")
    env = {
        **os.environ,
        "MLXSERVE_MODELS": str(models),
        "MLXSERVE_HOST": f"127.0.0.1:{_free_port()}",
        "MLXSERVE_DRAIN_SECONDS": "1",
    }  # SIGTERM below: a stream outlasts the drain, then ends with the error line
    mf = tmp_path_factory.mktemp("smol-mf") / "Modelfile"
    # Greedy, so the answer is reproducible; the model itself is what `make run` imports.
    mf.write_text(f"FROM {smollm2_gguf}\nPARAMETER temperature 0\n")
    subprocess.run(
        [BIN / "mlxctl", "create", "smollm2:135m", "-f", mf, "--local"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    proc = subprocess.Popen(
        [BIN / "mlxctl", "serve", "--preload", "smollm2:135m"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # printed once the model is loaded and the socket is bound
    assert "listening on" in line, proc.stderr.read()
    yield env, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _mlxctl(env, *args, timeout=120):
    return subprocess.run([BIN / "mlxctl", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_run_answers_with_paris(served):
    env, _ = served
    out = _mlxctl(env, "run", "smollm2:135m", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_list_ps_show_and_unknown_model(served):
    env, _ = served
    assert "smollm2:135m" in _mlxctl(env, "list").stdout
    assert "smollm2:135m" in _mlxctl(env, "ps").stdout
    shown = _mlxctl(env, "show", "smollm2:135m")
    assert "llama" in shown.stdout and "Q4_1" in shown.stdout
    assert "temperature" in _mlxctl(env, "show", "smollm2:135m", "--parameters").stdout
    missing = _mlxctl(env, "run", "nope", "hi")
    assert missing.returncode == 1 and "model 'nope' not found" in missing.stderr


def test_bench_cp_stop_rm(served):
    env, _ = served
    out = _mlxctl(env, "bench", "smollm2:135m", "-c", "2", "-n", "8", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["requests"] == 2 and report["aggregate_decode_tok_s"] > 0
    assert 0 < report["ttft_p50"] <= report["ttft_p99"]
    assert _mlxctl(env, "cp", "smollm2:135m", "copy:v1").returncode == 0
    assert "copy:v1" in _mlxctl(env, "list").stdout
    assert _mlxctl(env, "stop", "smollm2:135m").returncode == 0
    assert "smollm2:135m" not in _mlxctl(env, "ps").stdout
    assert _mlxctl(env, "rm", "copy:v1").returncode == 0
    listed = _mlxctl(env, "list").stdout
    assert "copy:v1" not in listed and "smollm2:135m" in listed  # shared blobs survived the rm
    assert _mlxctl(env, "verify").returncode == 0


def test_sigterm_ends_streams_with_an_error_line_and_exits_cleanly(served):
    env, proc = served
    url = "http://" + env["MLXSERVE_HOST"]
    # Counting goes on for thousands of tokens, so the stream is surely live at SIGTERM.
    body = {
        "model": "smollm2:135m",
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "raw": True,
        "options": {"num_predict": 4000},
    }
    lines = []
    with httpx.Client(base_url=url, timeout=120) as c:
        with c.stream("POST", "/api/generate", json=body) as r:
            for line in r.iter_lines():
                if not line.strip():
                    continue
                lines.append(json.loads(line))
                if len(lines) == 2:
                    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert "error" in lines[-1] and "shutting down" in lines[-1]["error"], (lines[-3:], stderr)
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr


def test_bad_setting_is_a_usage_error_not_a_traceback(tmp_path):
    env = {**os.environ, "MLXSERVE_MODELS": str(tmp_path), "MLXSERVE_ADMIT_WINDOW": "5"}
    out = _mlxctl(env, "serve", timeout=60)
    assert out.returncode == 2
    assert "MLXSERVE_ADMIT_WINDOW must be GAP_MS,MAX_MS" in out.stderr and "Traceback" not in out.stderr
